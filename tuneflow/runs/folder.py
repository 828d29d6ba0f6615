"""The run folder: ours alone (marked, locked), written so that a kill or a full disk loses nothing.

Layout (what the later embedding export / serving / workbench read):
  .tuneflow          marker: the names tuneflow wrote here (``--overwrite`` removes only those)
  .tuneflow.lock     held (``fcntl.flock``) by the process that runs in this folder; holds its pid
  run.json           status, recipe name, data fingerprint, timestamps, the command line
  recipe.json        the resolved recipe (overrides included); ``--resume`` compares against it
  metrics.csv        one row per epoch, appended: stage, epoch, loss, accuracy, val_loss, val_accuracy, lr;
                     every checkpoint records the rows written before it, so a resume rebuilds what a
                     cut, torn, emptied or deleted metrics.csv lost (:meth:`RunDir.rebuild_metrics`)
  curves.png, confusion.png, report.json, report.md, report.html
  model.keras        the whole classifier (pixels 0..255 in, probabilities out)
  backbone.weights.h5, backbone.json
  checkpoints/       numbered checkpoints and best.json (see :mod:`tuneflow.runs.checkpoints`)
  tensorboard/

Every JSON file is written to a temporary name, fsynced and renamed; metrics rows are appended
and fsynced. A write that fails (full disk, read-only folder) raises a :class:`RunError` naming
the path and leaves no temporary file.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import fnmatch
import io
import json
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from ..atomic import write_file
from ..errors import RunError
from . import names
from .names import METRICS

log = logging.getLogger("tuneflow")

FIELDS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
MARKER = ".tuneflow"
LOCK = ".tuneflow.lock"
TMP_TAG = ".tuneflow-tmp"  # in every temporary name tuneflow creates, so leftovers are recognisably ours
# What tuneflow writes at the top of a run folder, for runs whose marker does not list it (runs made
# before the marker existed, or files written by code that bypasses RunDir's own writers).
KNOWN = (names.RUN, names.RECIPE, names.LABELS, names.METRICS, names.CURVES, names.CONFUSION,
         names.CONFUSION_CSV, names.REPORT, names.REPORT_MD, names.REPORT_HTML, names.KERAS, names.SAVEDMODEL, names.BACKBONE_WEIGHTS,
         names.BACKBONE_JSON, names.PREDICTIONS, names.CHECKPOINTS, names.TENSORBOARD, "fold-*", names.TOP_LOSSES,
         "lr_find_*.png")


class RunExistsError(RunError, FileExistsError):
    pass


class RunLockedError(RunError):
    """Another process holds the run folder's lock."""


_fault_counts: dict[str, int] = {}


def fault(point: str) -> None:
    """Fault injection for tests: ``TUNEFLOW_FAULT=POINT`` (or ``POINT@N``, the N-th time) kills this
    process with SIGKILL at the named point, as a power cut or the OOM killer would."""
    want = os.environ.get("TUNEFLOW_FAULT")
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != point:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), 9)


def disk_error(path, exc: BaseException) -> RunError:
    """A RunError for a failed write: the path, the cause, and what to do."""
    code = getattr(exc, "errno", None)
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}.get(code) or getattr(exc, "strerror", None) or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        todo = "Free some space, or choose a --out on another disk"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = "Choose a --out you can write to"
    else:
        todo = "Check the disk and the folder"
    return RunError(f"Cannot write {path}: {reason}. {todo}; earlier checkpoints are intact, and "
                    "--resume continues from them.")


def fsync_dir(path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself is data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory: nothing more to do there
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (same directory, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}{TMP_TAG}")


def atomic_write(path, data: bytes | str, fault_point: str | None = None, label=None) -> Path:
    """Write ``data`` to ``path`` all or nothing (:func:`tuneflow.atomic.write_file`, durable: fsync
    of the file and its folder), under a temporary name the run folder recognises as its own. A
    failure raises :class:`RunError` naming ``path`` (or ``label``, the file the user asked for);
    the temporary file is removed."""
    path = Path(path)
    try:
        return write_file(path, data, durable=True, tmp=tmp_name(path),
                          before_rename=(lambda: fault(fault_point)) if fault_point else None)
    except OSError as exc:
        raise disk_error(label or path, exc) from None


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_json(path, what: str = "") -> dict:
    """A JSON file, or a :class:`RunError` naming it when it is cut off or damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise RunError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is damaged or cut off (not valid JSON: {exc}). "
                       + (what or "Delete it, or start the run again with --overwrite.")) from None


class _Lock:
    """An exclusive ``flock`` on ``LOCK`` for the run's lifetime; the kernel drops it when the
    process dies, so a run killed with SIGKILL never blocks the next one."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise disk_error(self.path, exc) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            pid, _, host = holder.partition("@")
            same = pid == str(os.getpid()) and host == socket.gethostname()
            raise RunLockedError(
                f"{folder} is in use by another tuneflow run (pid {pid}{' on ' + host if host else ''}"
                f"{', this very process: close the earlier RunDir first' if same else ''}). Wait for it "
                "to finish, stop it, or choose another --out.") from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
            os.fsync(self.fd)
        except OSError as exc:
            self.release()
            raise disk_error(self.path, exc) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __del__(self):
        self.release()


class RunDir:
    """One run folder, locked by this process until :meth:`close` (or the process's end).

    >>> with RunDir.open("runs/x", "small_similar") as run:      # doctest: +SKIP
    ...     run.start(recipe.to_dict(), bundle.fingerprint())
    ...     run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.9})
    """

    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        self.fresh = fresh
        self._lock: _Lock | None = None
        self._remove_folder = False  # on discard: the folder too, when tuneflow made it
        self._names: set[str] | None = None
        self._rows: list[dict] | None = None  # metrics.csv's rows as written (see metrics_history)

    # -- opening, locking, overwriting ----------------------------------------------------------
    @classmethod
    def open(cls, out, recipe_name: str, overwrite: bool = False, resume: bool = False) -> "RunDir":
        """Create (or, with ``resume``, reopen) a run folder and lock it. ``overwrite`` first removes
        the files of an earlier run, and refuses when the folder holds anything tuneflow did not write."""
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{recipe_name}-{stamp}"
            n = 1
            while out.exists():
                n += 1
                out = Path("runs") / f"{recipe_name}-{stamp}-{n}"
        out = Path(out)
        created = False
        if out.exists() and not out.is_dir():
            raise RunExistsError(f"{out} is a file, not a folder. Choose another --out.")
        if not out.exists():
            if resume:
                raise RunExistsError(f"--resume: there is no run in {out} to continue.")
            try:
                out.mkdir(parents=True)
                created = True
            except FileExistsError:
                pass  # another process made it this instant: the lock below decides
            except OSError as exc:
                raise disk_error(out, exc) from None
        probe = cls(out, fresh=False)
        # A folder that is not a run gets nothing written into it, not even a lock file.
        if probe._entries() and not probe.is_run():
            cls._refuse_foreign(out, resume, overwrite, probe._entries())
        was_run = probe.is_run()
        run = cls(out, fresh=True)
        run._lock = _Lock(out)
        try:
            run._remove_folder = created or was_run
            run._settle(resume, overwrite)
        except BaseException:
            if not was_run:  # leave the folder as it was: no lock file, and no folder if we made it
                _unlink_quietly(out / LOCK)
                _unlink_quietly(out / MARKER)
            run.close()
            if created:
                try:
                    out.rmdir()
                except OSError:
                    pass
            raise
        return run

    @staticmethod
    def _refuse_foreign(out: Path, resume: bool, overwrite: bool, entries: list[str]):
        shown = ", ".join(sorted(entries)[:8]) + (", ..." if len(entries) > 8 else "")
        if resume:
            raise RunExistsError(f"--resume: {out} is not a tuneflow run folder (no run.json or "
                                 f"{MARKER}; it holds {shown}).")
        if overwrite:
            raise RunExistsError(f"--overwrite refuses to delete {out}: it is not a tuneflow run folder "
                                 f"(it holds {shown}). Choose another --out.")
        raise RunExistsError(f"{out} already holds files tuneflow did not write ({shown}). "
                             "Choose another --out.")

    def _settle(self, resume: bool, overwrite: bool) -> None:
        """Under the lock: decide fresh / resumed / replaced, and mark the folder as ours."""
        entries = self._entries()
        if entries and not self.is_run():  # filled by someone else between the first look and the lock
            self._refuse_foreign(self.path, resume, overwrite, entries)
        if resume:
            if not entries:
                raise RunExistsError(f"--resume: there is no run in {self.path} to continue.")
            self.fresh = False
        elif entries:
            if not overwrite:
                raise RunExistsError(f"{self.path} already holds a tuneflow run. Use --resume to continue "
                                     "that run, --overwrite to replace it, or choose another --out.")
            foreign = self.foreign_files()
            if foreign:
                shown = "\n  ".join(foreign[:20]) + (f"\n  ... and {len(foreign) - 20} more"
                                                    if len(foreign) > 20 else "")
                raise RunExistsError(
                    f"--overwrite refuses to replace the run in {self.path}: it also holds files tuneflow "
                    f"did not write:\n  {shown}\nMove them out of the folder, or choose another --out.")
            print(f"--overwrite: removing the earlier run in {self.path}", file=sys.stderr)
            self._remove_ours(keep_lock=True)
            self._names = None
        self._register_all({LOCK} if self.fresh else set())

    def close(self) -> None:
        """Release the lock (the files stay). Safe to call twice."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.fd is not None

    # -- what is ours ----------------------------------------------------------------------------
    def _entries(self) -> list[str]:
        """Top-level names, ignoring a bare lock file (left by a process that stopped at once)."""
        try:
            return [p.name for p in self.path.iterdir() if p.name != LOCK]
        except FileNotFoundError:
            return []

    def is_run(self) -> bool:
        return (self.path / MARKER).exists() or (self.path / names.RUN).exists()

    def _registered(self) -> set[str]:
        if self._names is None:
            names: set[str] = set()
            if (self.path / MARKER).exists():
                try:
                    names = set(json.loads((self.path / MARKER).read_text()).get("names", []))
                except (OSError, ValueError, AttributeError):
                    log.warning("%s is damaged; only the names tuneflow always writes count as its own",
                                self.path / MARKER)
            self._names = names
        return self._names

    def register(self, name: str) -> None:
        """Record a top-level name as written by tuneflow (``run / name`` does this)."""
        top = Path(name).parts[0] if name else name
        if top and top not in self._registered():
            self._register_all({top}, label=self.path / name)

    def _register_all(self, names: set[str], label=None) -> None:
        self._registered().update(names)
        if self.locked:  # only the process that owns the folder writes the marker
            atomic_write(self.path / MARKER, json.dumps({"tuneflow": 1, "names": sorted(self._names)},
                                                        indent=1), label=label)

    def _own_name(self, top: str) -> bool:
        names = self._registered()
        if top in (MARKER, LOCK) or TMP_TAG in top or top in names or any(
                fnmatch.fnmatchcase(top, k) for k in KNOWN):
            return True
        # ".NAME.<anything>": the temporary of one of our files (an atomic write cut off by a kill)
        return top.startswith(".") and any(top[1:].startswith(n + ".") for n in (*names, *KNOWN)
                                           if "*" not in n)

    def _ours(self, rel: tuple[str, ...], is_dir: bool = False) -> bool:
        """Whether ``rel`` (path parts under the run folder) was written by tuneflow. Inside the
        folders tuneflow fills by name patterns (checkpoints/, tensorboard/, fold-N/), each file
        must match them too: a user's file put there is not ours."""
        top = rel[0]
        if not self._own_name(top):
            return False
        if len(rel) == 1 or top.startswith("."):
            return True
        if top == "checkpoints":
            return _checkpoint_file(rel[1:], is_dir)
        if top == "tensorboard":
            return is_dir or rel[-1].startswith("events.out.tfevents.")
        if fnmatch.fnmatchcase(top, "fold-*"):  # a nested run folder of K-fold cross-validation
            return RunDir(self.path / top, fresh=False)._ours(rel[1:], is_dir)
        return True  # a folder tuneflow wrote by name (model/, ...): all of it is tuneflow's

    def _walk(self):
        """(relative parts, path, is ours, is dir) for every entry under the run folder; a folder
        that is not ours is reported once, not entered; symlinks are never followed."""
        for root, dirs, files in os.walk(self.path):
            base = Path(root)
            keep = []
            for name in dirs:
                p = base / name
                rel = p.relative_to(self.path).parts
                if p.is_symlink():
                    files.append(name)
                    continue
                ours = self._ours(rel, is_dir=True)
                yield rel, p, ours, True
                if ours:
                    keep.append(name)
            dirs[:] = keep
            for name in files:
                p = base / name
                rel = p.relative_to(self.path).parts
                yield rel, p, self._ours(rel), False

    def foreign_files(self) -> list[str]:
        """What in the folder tuneflow did not write (relative paths; a folder ends with /)."""
        return sorted("/".join(rel) + ("/" if d else "") for rel, _, ours, d in self._walk() if not ours)

    def _remove_ours(self, keep_lock: bool = False) -> None:
        """Delete what tuneflow wrote, then its folders that became empty; nothing else."""
        entries = list(self._walk())
        for rel, p, ours, is_dir in entries:
            if ours and not is_dir and not (keep_lock and rel == (LOCK,)):
                _unlink_quietly(p)
        for rel, p, ours, is_dir in sorted(entries, key=lambda e: -len(e[0])):  # deepest first
            if ours and is_dir:
                try:
                    p.rmdir()
                except OSError:
                    pass  # not empty: it holds something tuneflow did not write
        if not keep_lock and self._remove_folder:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def discard_if_fresh(self) -> bool:
        """Remove a fresh run that failed before it saved anything resumable (only tuneflow's files,
        and the folder if tuneflow made it and it is empty); release the lock either way."""
        if not self.fresh or _has_checkpoint(self.path / "checkpoints"):
            return False
        if self._lock is not None and self._lock.fd is not None:
            # unlinked while still held, then released: no other process can lock the old file meanwhile
            self._remove_ours(keep_lock=True)
            _unlink_quietly(self.path / LOCK)
            self.close()
            if self._remove_folder:
                try:
                    self.path.rmdir()
                except OSError:
                    pass
        else:
            self._remove_ours()
        return True

    # -- files ------------------------------------------------------------------------------------
    def __truediv__(self, name) -> Path:
        self.register(str(name))
        return self.path / name

    def write_json(self, name: str, obj) -> Path:
        """Atomic (temporary name, fsync, rename); RunError naming the file if the disk refuses."""
        self.register(name)
        return atomic_write(self.path / name, json.dumps(obj, indent=2, default=str),
                            fault_point=f"mid_{name}")

    def write_text(self, name: str, text: str) -> Path:
        self.register(name)
        return atomic_write(self.path / name, text)

    def read_json(self, name: str) -> dict:
        return read_json(self.path / name)

    @staticmethod
    def stored_recipe(out) -> dict | None:
        """The recipe a run folder records (recipe.json), or None when ``out`` holds none (a new
        folder) or a damaged one (resuming then says what is wrong)."""
        p = Path(out) / names.RECIPE
        try:
            got = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return got if isinstance(got, dict) else None

    def run_info(self) -> dict:
        """run.json as it stands ({} when absent or damaged: status() rebuilds it)."""
        try:
            return read_json(self.path / names.RUN)
        except RunError:
            return {}

    def status(self, status: str, **extra) -> None:
        """Update run.json. A damaged run.json (it holds only status) is rebuilt, with a warning."""
        p = self.path / names.RUN
        info = {}
        if p.exists():
            try:
                info = read_json(p)
            except RunError as exc:
                log.warning("%s; rebuilding it", exc)
        info.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), pid=os.getpid(), **extra)
        info.setdefault("command", " ".join(sys.argv))
        self.write_json(names.RUN, info)

    # -- recipe and data: what a resume must match ------------------------------------------------
    def start(self, recipe: dict, data_fingerprint: str | None = None, force: bool = False,
              ignore=()) -> list[str]:
        """Record what this run trains (recipe.json, the data fingerprint in run.json), or, when the
        run is resumed, check that it is the same (:meth:`check_resume`). Sets status "running".
        Returns the differences accepted with ``force`` (also logged and kept in run.json)."""
        changes = [] if self.fresh else self.check_resume(recipe, data_fingerprint, force, ignore)
        if self.fresh or changes or not (self.path / names.RECIPE).exists():
            self.write_json(names.RECIPE, recipe)
        extra = {"recipe": recipe.get("name"), "data_fingerprint": data_fingerprint}
        if changes:
            try:
                resumes = read_json(self.path / names.RUN).get("resumed_with_changes", [])
            except RunError:
                resumes = []
            extra["resumed_with_changes"] = resumes + [
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}]
        self.status("running", **extra)
        return changes

    def check_resume(self, recipe: dict, data_fingerprint: str | None, force: bool = False,
                     ignore=()) -> list[str]:
        """Compare the resolved recipe and the data fingerprint with those the run was started with.
        Each difference reads ``key: old -> new`` (``head.lr: 0.001 -> 0.003``); any difference is a
        RunError unless ``force`` (then it is logged and returned). ``ignore``: keys not compared."""
        hint = ("Resume with the recipe, --set values and data the run was started with, add --force "
                "to continue with the new ones, or start a new run (--overwrite or another --out).")
        changes = []
        stored = None
        if (self.path / names.RECIPE).exists():
            try:
                stored = read_json(self.path / names.RECIPE, "Add --force to resume with the recipe given now.")
            except RunError:
                if not force:
                    raise
                changes.append("recipe.json: unreadable -> replaced")
        else:
            log.warning("%s has no recipe.json: the recipe cannot be checked against the run's", self.path)
        if stored is not None:
            recipe = json.loads(json.dumps(recipe, default=str))  # as recipe.json holds it: tuples are lists
            old, new = _flatten(stored), _flatten(recipe)
            for key in sorted(set(old) | set(new), key=_key_order(recipe)):
                if key in ignore:
                    continue
                if old.get(key, _ABSENT) != new.get(key, _ABSENT):
                    changes.append(f"{key}: {_show(old.get(key, _ABSENT))} -> {_show(new.get(key, _ABSENT))}")
        if data_fingerprint is not None:
            try:
                info = read_json(self.path / names.RUN) if (self.path / names.RUN).exists() else {}
            except RunError:
                if not force:
                    raise RunError(f"{self.path / 'run.json'} is damaged, so the data cannot be checked "
                                   "against the run's. Add --force to resume anyway.") from None
                info = {}
            before = info.get("data_fingerprint")
            if before is None:
                log.warning("%s records no data fingerprint: the data cannot be checked", self.path)
            elif before != data_fingerprint:
                changes.append(f"data: fingerprint {before} -> {data_fingerprint} (images, labels, classes "
                               "or the train/val split differ)")
        if changes and not force:
            raise RunError(f"--resume: {self.path} was started with another recipe or data:\n  "
                           + "\n  ".join(changes) + "\n" + hint)
        for c in changes:
            log.warning("--resume --force: continuing with a change: %s", c)
        return changes

    # -- metrics.csv: appended, fsynced, a torn last line tolerated --------------------------------
    def metrics_rows(self) -> list[dict]:
        """The rows of metrics.csv (:func:`read_metrics`, with warnings); the next append repairs the file."""
        return read_metrics(self.path / METRICS)

    def metrics_history(self) -> list[dict]:
        """The rows this run has in metrics.csv, oldest first, each as the file holds it (strings):
        what a checkpoint records so that a resume can rebuild them (:meth:`rebuild_metrics`)."""
        return [dict(r) for r in self._history()]

    def _history(self) -> list[dict]:
        if self._rows is None:
            self._rows = self.metrics_rows()
        return self._rows

    def append_metrics(self, row: dict) -> None:
        """Append one row and fsync it (the file is never rewritten during training)."""
        p = self.path / METRICS
        self.register(METRICS)
        history = self._history()  # before the append: the row joins it once it is on disk
        try:
            header = self._repair_metrics(p)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if header is None:
                header = FIELDS
                w.writerow(header)
            cells = ["" if row.get(k) is None else str(row[k]) for k in header]  # as csv writes them
            w.writerow(cells)
            line = buf.getvalue().encode("utf-8")
            with open(p, "ab") as f:
                if os.environ.get("TUNEFLOW_FAULT", "").startswith("mid_metrics_row"):
                    f.write(line[: len(line) // 2])  # half a row on disk, then the kill
                    f.flush()
                    os.fsync(f.fileno())
                    fault("mid_metrics_row")
                    f.write(line[len(line) // 2:])
                else:
                    f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise disk_error(p, exc) from None
        history.append(dict(zip(header, cells)))

    def _repair_metrics(self, p: Path) -> list[str] | None:
        """Cut a torn last line (and trailing NULs a crash can leave) so the next row starts on a line
        of its own; returns the file's header (None for a new or empty file)."""
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return None
        if size == 0:
            return None
        with open(p, "rb") as f:
            first = f.readline()
            f.seek(size - 1)
            whole = f.read(1) == b"\n"
        if not whole:
            data = p.read_bytes()
            keep = data.rstrip(b"\0").rfind(b"\n") + 1
            log.warning("%s: removing a torn last line %r before appending", p, data[keep:keep + 80])
            os.truncate(p, keep)
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            if keep == 0:
                return None
            first = data[:data.find(b"\n") + 1]
        header = next(csv.reader(io.StringIO(first.decode("utf-8", "replace"))), None)
        return header or None

    def truncate_metrics(self, keep) -> None:
        """Keep rows for which ``keep(stage_index, epoch)`` is true: one atomic rewrite of the file."""
        self.rebuild_metrics(keep)

    def rebuild_metrics(self, keep, known: list[dict] | None = None) -> int:
        """metrics.csv as of a resume point: the file's rows for which ``keep(stage_index, epoch)``
        is true, and every row of ``known`` (the rows the resumed checkpoint recorded: the source of
        truth) that the file lost to a cut or torn write, an emptied or deleted file; in (stage,
        epoch) order, rewritten atomically when that changes the file. Returns how many rows came
        from ``known``."""
        p = self.path / METRICS
        rows = {k: r for r in self.metrics_rows() if (k := _row_key(r)) is not None and keep(*k)}
        restored = 0
        for r in known or ():
            k = _row_key(r) if isinstance(r, dict) else None
            if k is None:
                log.warning("a checkpoint records a malformed metrics row, ignored: %r", r)
                continue
            if keep(*k):
                restored += k not in rows
                rows[k] = {f: "" if v is None else str(v) for f, v in r.items()}
        ordered = [rows[k] for k in sorted(rows)]
        header = FIELDS + sorted({f for r in ordered for f in r} - set(FIELDS))
        buf = io.StringIO()
        w = csv.DictWriter(buf, header, lineterminator="\n")
        w.writeheader()
        w.writerows(ordered)
        data = buf.getvalue().encode("utf-8")
        try:
            same = p.read_bytes() == data
        except OSError:
            same = False
        if not same:
            self.register(METRICS)
            atomic_write(p, data)
        self._rows = [dict(r) for r in ordered]
        return restored


_ABSENT = object()


def _flatten(recipe: dict) -> dict:
    """``{"head.lr": 0.001, "batch_size": 32, ...}``: stages by name, as ``--set`` spells them."""
    flat = {}
    for k, v in recipe.items():
        if k == "stages" and isinstance(v, list):
            for i, stage in enumerate(v):
                name = stage.get("name", str(i)) if isinstance(stage, dict) else str(i)
                for sk, sv in (stage.items() if isinstance(stage, dict) else [("", stage)]):
                    if sk != "name":
                        flat[f"{name}.{sk}"] = sv
            flat["stages"] = [s.get("name") if isinstance(s, dict) else s for s in v]
        elif k != "description":
            flat[k] = v
    return flat


def _key_order(recipe: dict):
    order = {k: i for i, k in enumerate(_flatten(recipe))}
    return lambda k: (order.get(k, len(order)), k)


def _show(v) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v) if isinstance(v, (str, list, type(None))) else repr(v)


def read_metrics(p: Path, warn: bool = True) -> list[dict]:
    """The rows of a metrics.csv as the file holds them (strings), the one reader of that file (the
    run, ``compare``, a search polling its trials). A torn last line (a kill or a full disk
    mid-write; or a run still writing it) or a malformed row is dropped, with a warning when
    ``warn``; a missing file has no rows."""
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunError(f"Cannot read {p}: {exc.strerror or exc}.") from None
    complete, _, torn = data.rstrip(b"\0").rpartition(b"\n") if b"\n" in data else (b"", b"", data)
    if torn.strip(b"\0") and warn:
        log.warning("%s: dropping a torn last line %r (the run stopped while writing it)", p, torn[:80])
    reader = csv.reader(io.StringIO(complete.decode("utf-8", "replace")))
    header = next(reader, None)
    rows = []
    for i, values in enumerate(reader, start=2):
        if not values:
            continue
        if header is None or len(values) != len(header) or not _is_row(values, header):
            if warn:
                log.warning("%s: line %d is malformed, ignored: %s", p, i, ",".join(values)[:80])
            continue
        rows.append(dict(zip(header, values)))
    return rows


def validation_curve(p: Path) -> list[dict]:
    """metrics.csv's epochs as numbers: ``stage``, ``epoch`` (ints), ``val_accuracy``, ``val_loss``
    (floats), in file order; rows without them are skipped. What ``compare`` and a search's pruner
    read, quietly: a running run's last line may be half written."""
    out = []
    for r in read_metrics(p, warn=False):
        try:
            out.append({"stage": int(r["stage"]), "epoch": int(r["epoch"]),
                        "val_accuracy": float(r["val_accuracy"]), "val_loss": float(r["val_loss"])})
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _row_key(row: dict) -> tuple[int, int] | None:
    """A metrics row's (stage index, epoch), or None when either is missing or not an integer."""
    try:
        return int(row["stage"]), int(row["epoch"])
    except (KeyError, TypeError, ValueError):
        return None


def _is_row(values: list[str], header: list[str]) -> bool:
    """A row whose stage and epoch are integers (a line glued onto a torn one is not)."""
    try:
        for k in ("stage", "epoch"):
            if k in header:
                int(values[header.index(k)])
        return True
    except ValueError:
        return False


def _checkpoint_file(rel: tuple[str, ...], is_dir: bool = False) -> bool:
    """Entries tuneflow's checkpoints consist of (this layout and the one before it)."""
    top = rel[0]
    if TMP_TAG in top or fnmatch.fnmatchcase(top, "ckpt-*"):
        return True  # a numbered checkpoint folder, or one being written: entirely ours
    if top in ("last", "best", "stage_best"):  # the layout before numbered folders
        if len(rel) == 1:
            return is_dir
        return len(rel) == 2 and (rel[1] in ("checkpoint", "best.json") or rel[1].startswith("ckpt-")
                                  or rel[1].endswith(".tmp"))
    return len(rel) == 1 and top == "best.json"


def _has_checkpoint(folder: Path) -> bool:
    """Whether a complete checkpoint exists (numbered folder with its manifest, or the older layout)."""
    return any(folder.glob("ckpt-*/manifest.json")) or any(folder.glob("last/*.index"))
