"""Atomic replacement of folders: a reader finds the old folder or the new one, never half of one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``target`` (same filesystem), replacing any earlier
    ``target``: the old one is renamed aside first and removed only after the new one is in place."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
