"""Atomic replacement of files and folders: a reader finds the old one or the new one, never half of one; writers racing for one name each write their own temporary file."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def write_file(path: str | Path, data: bytes | str, durable: bool = False, *, tmp: str | Path | None = None,
               before_rename=None) -> Path:
    """Write ``data`` to ``path`` all or nothing: into a temporary file of this writer's own (its
    pid and a random tag: several processes writing one name never rename each other's file),
    then renamed over ``path``. ``durable``: fsync the file and its folder too. On any failure the
    temporary file is removed and the error raised; ``path`` is the old file or absent.
    ``tmp``: the temporary file's name (a sibling of ``path``; it must not exist), for writers whose
    folder recognises its own leftovers by name; ``before_rename``: called between the write and
    the rename (a fault-injection point)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


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
