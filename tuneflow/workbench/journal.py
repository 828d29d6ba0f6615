"""A search folder's journal and lock: one search per folder, its Optuna study in a journal file
that a killed search leaves repairable."""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from ..errors import RunError

log = logging.getLogger("tuneflow")

JOURNAL = "optuna-journal.log"
LOCK = "search.lock"


def claim_folder(out: Path):
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a folder for the search.")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / JOURNAL).exists():
        raise RunError(f"--out {out} holds files but no tuneflow search ({JOURNAL} missing); "
                       "choose another --out.")
    out.mkdir(parents=True, exist_ok=True)


def lock_folder(out: Path):
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunError(f"Another tuneflow search is running in {out}; wait for it or stop it first.") from None
    return f


def journal_storage(path: Path):
    """The journal storage at ``path``, after repairs that are safe because we hold the folder lock:
    a line cut short by a kill is removed (Optuna would append after it and corrupt the next
    record), and a lock file left by a killed writer is removed (Optuna would wait 30 s)."""
    from optuna.storages import JournalStorage
    try:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileOpenLock
        from optuna.storages import JournalFileStorage as JournalFileBackend
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.info("%s: removing a record cut short by a kill (%d bytes)", path, len(data) - keep)
            with open(path, "r+b") as f:
                f.truncate(keep)
    stale = Path(str(path) + ".lock")
    if stale.exists():
        stale.unlink()
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
