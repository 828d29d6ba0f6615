"""Checkpoints that survive any kill: numbered across stages, written whole or not at all, verified.

``RUN/checkpoints/ckpt-000007/`` is one checkpoint (model, optimizer with its slot variables,
stage, epoch): ``ckpt.index``, ``ckpt.data-*`` and ``manifest.json`` (sha256 of the files, the
model's variable shapes, stage, epoch, validation metrics, early-stopping state, and
``metrics_rows``: the run's metrics.csv rows up to this checkpoint, from which a resume rebuilds
rows the file lost). Numbers only
grow, across stages and resumes. A save writes into a temporary folder, fsyncs it, renames it
into place and writes the manifest last: a checkpoint exists once its manifest does.
``best.json`` names the best checkpoint (val_accuracy, then val_loss) and each stage's best; it
is derived from the manifests and repaired from them when a kill cut it off, so after a kill at
any point the best is the old best or the new one, whole. Kept: the newest ``max_to_keep`` plus
each stage's best and the overall best. A checkpoint whose files no longer match its manifest
is reported with its path and the previous good one is used.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import tensorflow as tf

from ..errors import RunError
from .folder import TMP_TAG, atomic_write, disk_error, fault, fsync_dir, read_json

log = logging.getLogger("tuneflow")

MANIFEST = "manifest.json"
PREFIX = "ckpt"  # the TensorFlow file prefix inside each checkpoint folder
_NUMBERED = re.compile(r"^ckpt-(\d+)$")


class CheckpointMismatchError(RunError, ValueError):
    """The checkpoint was written for a different backbone or head."""


class NoCheckpointError(RunError, FileNotFoundError):
    """No usable checkpoint where one was asked for."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(ckpt) -> tuple[str, Path]:
    """(TensorFlow prefix, manifest path) of a checkpoint folder, or of a prefix of the older layout."""
    p = Path(ckpt)
    if p.is_dir():
        return str(p / PREFIX), p / MANIFEST
    if p.name == PREFIX and (p.parent / MANIFEST).exists():
        return str(p), p.parent / MANIFEST
    return str(p), Path(str(p) + ".manifest.json")


def _data_files(ckpt) -> list[Path]:
    prefix, manifest = _resolve(ckpt)
    p = Path(prefix)
    return sorted(f for f in p.parent.glob(p.name + ".*")
                  if f != manifest and not f.name.endswith(".manifest.json") and TMP_TAG not in f.name)


def named_weights(model) -> dict:
    """``layer/variable -> variable``. Keyed by the innermost layer's name (unique in a tuneflow model),
    not ``v.path``, which differs between a freshly built model and a reloaded ``model.keras``; a
    name that repeats falls back to the whole path."""
    short = ["/".join(v.path.split("/")[-2:]) for v in model.weights]
    return {(k if short.count(k) == 1 else v.path): v for k, v in zip(short, model.weights)}


def variable_shapes(model) -> dict[str, list[int]]:
    return {k: [int(d) for d in v.shape] for k, v in named_weights(model).items()}


class _ByName(tf.Module):
    """A model's weights for a checkpoint, by name: restored whatever the nesting of the model's
    layers, and without what a compiled Keras model also tracks (its optimizer, whose state from one
    stage does not fit the next stage's optimizer, and its metrics' variables)."""

    def __init__(self, model):
        super().__init__(name="weights")
        self.by_name = named_weights(model)


def verify(ckpt) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    _, mpath = _resolve(ckpt)
    if not mpath.exists():
        return "no manifest (the write was cut off)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable manifest {mpath}"
    for name, digest in files.items():
        f = mpath.parent / name
        if not f.exists():
            return f"missing file {f}"
        if _sha256(f) != digest:
            return f"file {f} is truncated or corrupted (checksum mismatch)"
    return None


def check_compatible(ckpt, model) -> None:
    """Raise a readable error naming every variable whose presence or shape differs."""
    _, mpath = _resolve(ckpt)
    saved, ours = read_json(mpath)["variables"], variable_shapes(model)
    # shape mismatches first: they say most about what differs
    problems = [f"  {k}: checkpoint {saved[k]} vs model {ours[k]}"
                for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
    problems += [f"  {k}: in this model {ours[k]}, not in the checkpoint" for k in sorted(set(ours) - set(saved))]
    problems += [f"  {k}: in the checkpoint {saved[k]}, not in this model" for k in sorted(set(saved) - set(ours))]
    if problems:
        shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointMismatchError(
            f"Checkpoint {ckpt} does not fit this model ({len(problems)} mismatching variables):\n"
            + "\n".join(shown) + "\nRestore it into the backbone, input size and head it was "
            "trained with (see the run's recipe.json).")


def read_model(model, ckpt) -> None:
    """Read ``ckpt``'s model weights into ``model``, or raise CheckpointMismatchError when any of the
    model's variables found no value: TensorFlow matches variables by the object graph (layers
    nested alike), and without this check a differently nested model would silently keep its own."""
    check_compatible(ckpt, model)
    prefix, mpath = _resolve(ckpt)
    if read_json(mpath).get("format") == 2:
        status = tf.train.Checkpoint(weights=_ByName(model)).read(prefix)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as exc:
            raise CheckpointMismatchError(
                f"Checkpoint {ckpt} does not restore into this model: "
                f"{str(exc).splitlines()[0][:200]}") from None
        status.expect_partial()
        return
    # The layout before numbered folders saved the model's own object graph.
    from tensorflow.python.util import object_identity
    # The model's weights only: a compiled model also tracks its optimizer, whose variables in the
    # checkpoint may belong to another stage's optimizer (Adam's moments vs SGD's momentum: same
    # names, other shapes), so the optimizer is out of the object graph while reading.
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        model.optimizer = None
    try:
        status = tf.train.Checkpoint(model=model).read(prefix)
        status.expect_partial()
    finally:
        if optimizer is not None:
            model.optimizer = optimizer
    # Only the model's weights must all find a value: a compiled model also tracks its metrics'
    # and loss trackers' variables, which a checkpoint written before compile() does not hold.
    matched = object_identity.ObjectIdentitySet(status._checkpoint.object_by_proto_id.values())
    missing = [w.path for w in model.weights if w not in matched]
    if missing:
        raise CheckpointMismatchError(
            f"Checkpoint {ckpt} does not restore into this model: its variables have the right names and "
            f"shapes, but its layers are nested differently from the model that was trained "
            f"({len(missing)} weights found no value, e.g. {', '.join(missing[:3])}). Restore into the "
            "model as the run built it, e.g. tuneflow.load(RUN, checkpoint=...), not into a loaded "
            "model.keras.")


def _scan(folder: Path) -> dict[int, dict]:
    """``number -> manifest`` of the complete checkpoints in ``folder`` (those with a manifest)."""
    found = {}
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for d in entries:
        m = _NUMBERED.match(d.name)
        if not m or not (d / MANIFEST).exists():
            continue
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:  # pruned this instant by the process that owns the folder
            continue
        except (OSError, ValueError) as exc:
            log.warning("checkpoint %s has an unreadable manifest (%s); it is not used", d, exc)
            continue
        manifest["path"] = str(d)
        found[int(m.group(1))] = manifest
    return found


def _score(rec: dict):
    """Sort key of a checkpoint as a best candidate (higher is better), or None if it has no
    finite val_accuracy. Ties: lower val_loss, then the earlier epoch (a later equal one never
    replaces it, and every worker of a multi-worker run picks the same one)."""
    m = rec.get("metrics") or {}
    acc, loss = m.get("val_accuracy"), m.get("val_loss")
    if acc is None or not math.isfinite(acc) or (loss is not None and not math.isfinite(loss)):
        return None
    return (acc, -(loss if loss is not None else math.inf), -int(rec["stage"]), -int(rec["epoch"]))


def _summary(rec: dict) -> dict:
    m = rec.get("metrics") or {}
    return {"checkpoint": Path(rec["path"]).name, "stage": rec["stage"], "epoch": rec["epoch"],
            "val_accuracy": m.get("val_accuracy"), "val_loss": m.get("val_loss")}


def _best_of(records: dict[int, dict], bad=frozenset()) -> tuple[int | None, dict[int, int]]:
    """(number of the best checkpoint, {stage: number of that stage's best epoch}). A stage's best
    counts its epochs only (>= 1), not the checkpoint that marks the previous stage's end."""
    scored = {n: _score(r) for n, r in records.items() if r["path"] not in bad}
    scored = {n: s for n, s in scored.items() if s is not None}
    best = max(scored, key=lambda n: (scored[n], -n), default=None)
    stages: dict[int, int] = {}
    for n, s in scored.items():
        st = int(records[n]["stage"])
        if int(records[n]["epoch"]) >= 1 and (st not in stages or (s, -n) > (scored[stages[st]], -stages[st])):
            stages[st] = n
    return best, stages


class Checkpoints:
    """The numbered checkpoints of one run: save, find the newest good one, restore, keep the best.

    >>> ckpts = Checkpoints(run / "checkpoints", model, optimizer)          # doctest: +SKIP
    >>> ckpts.save(stage=1, epoch=3, metrics={"val_accuracy": 0.9, "val_loss": 0.3})  # doctest: +SKIP
    >>> ckpts.restore(ckpts.latest_good())                                  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, model, optimizer=None, max_to_keep: int = 2,
                 read_folder: str | Path | None = None):
        self.folder = Path(folder)
        # Where resumes read from: the run's own folder, or the chief's for another worker.
        self.read_folder = Path(read_folder) if read_folder is not None else self.folder
        self.model = model
        self.max_to_keep = max_to_keep
        self.stage = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.bind_optimizer(optimizer)
        self.best_json = self.folder / "best.json"
        self._bad: set[str] = set()  # checkpoints found damaged: never "best", never resumed from
        self.restored: dict | None = None  # the record restore_best restored
        self._records = _scan(self.folder)
        if self.folder.is_dir():
            self._tidy()

    def bind_optimizer(self, optimizer) -> None:
        """Each stage has its own optimizer: checkpoints from now on carry this one's state."""
        self.optimizer = optimizer
        objs = {"weights": _ByName(self.model), "stage": self.stage, "epoch": self.epoch}
        if optimizer is not None:
            objs["optimizer"] = optimizer
        self.ckpt = tf.train.Checkpoint(**objs)

    # -- saving --------------------------------------------------------------------------------------
    def save(self, stage: int, epoch: int, metrics: dict | None = None,
             early_stopping: dict | None = None, rows: list[dict] | None = None) -> str:
        """A training checkpoint: (stage, epoch) means "epoch epochs of stage done"; (stage + 1, 0)
        marks a finished stage. ``metrics`` (val_accuracy, val_loss) make it a candidate for best.
        ``rows``: the run's metrics.csv rows so far (``RunDir.metrics_history()``), recorded in the
        manifest, written with the checkpoint, all or nothing. Returns its folder. A failed write
        raises RunError naming the path and leaves nothing."""
        number = max([*self._records, *self._numbers_on_disk(), 0]) + 1
        final = self.folder / f"ckpt-{number:06d}"
        tmp = self.folder / f".{final.name}{TMP_TAG}"
        self.stage.assign(stage)
        self.epoch.assign(epoch)
        try:
            fault("before_data")
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            self.ckpt.write(str(tmp / PREFIX))
            _fsync_tree(tmp)
            fault("after_data_before_rename")
            os.rename(tmp, final)
            fsync_dir(self.folder)
            fault("after_rename_before_manifest")
            manifest = {"format": 2, "number": number, "stage": int(stage), "epoch": int(epoch),
                        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                        "files": {f.name: _sha256(f) for f in _data_files(final)},
                        "variables": variable_shapes(self.model)}
            if early_stopping is not None:
                manifest["early_stopping"] = early_stopping
            if rows is not None:
                manifest["metrics_rows"] = rows
            atomic_write(final / MANIFEST, json.dumps(manifest, indent=1), fault_point="mid_manifest")
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / MANIFEST).exists():
                shutil.rmtree(final, ignore_errors=True)
            if isinstance(exc, (OSError, tf.errors.OpError)):
                raise disk_error(final, _as_os_error(exc)) from None
            raise
        fault("after_manifest_before_best")
        manifest["path"] = str(final)
        self._records[number] = manifest
        self._write_best()
        fault("after_best_before_prune")
        self._prune()
        return str(final)

    def save_stage_best(self, stage: int, epoch: int) -> None:
        """Nothing to do: :meth:`save` keeps each stage's best checkpoint (kept for older callers)."""

    def _numbers_on_disk(self) -> list[int]:
        try:
            names = [p.name.lstrip(".").split(".")[0] for p in self.folder.iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [int(m.group(1)) for m in map(_NUMBERED.match, names) if m]

    def _write_best(self) -> None:
        """best.json from the manifests: rewritten (atomically) only when it changes."""
        best, stages = _best_of(self._records, self._bad)
        record = None
        if best is not None:
            record = {**_summary(self._records[best]),
                      "stages": {str(s): _summary(self._records[n]) for s, n in sorted(stages.items())}}
        current = None
        if self.best_json.exists():
            try:
                current = json.loads(self.best_json.read_text())
            except (OSError, ValueError):
                log.warning("%s was cut off or damaged; rebuilt from the checkpoints' manifests", self.best_json)
        if record is not None and record != current:
            atomic_write(self.best_json, json.dumps(record, indent=1), fault_point="mid_best_json")

    def _keep(self) -> set[int]:
        best, stages = _best_of(self._records, self._bad)
        newest = sorted(self._records)[-self.max_to_keep:] if self.max_to_keep > 0 else []
        return set(newest) | set(stages.values()) | ({best} if best is not None else set())

    def _prune(self) -> None:
        """Delete checkpoints outside the newest N, the stage bests and the best: manifest first (so
        a kill midway leaves a folder that is plainly incomplete), then the files."""
        keep = self._keep()
        for n in sorted(set(self._records) - keep):
            d = Path(self._records.pop(n)["path"])
            try:
                os.unlink(d / MANIFEST)
                fsync_dir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise disk_error(d / MANIFEST, exc) from None
            fault("mid_prune")
            shutil.rmtree(d, ignore_errors=True)

    def _tidy(self) -> None:
        """After a kill: remove half-written checkpoints and temporaries, bring best.json up to date
        with the manifests, and prune what the kill left over. Only in the run's own folder."""
        for p in self.folder.iterdir():
            if TMP_TAG in p.name:
                _remove(p)
            elif _NUMBERED.match(p.name) and p.is_dir():
                if not (p / MANIFEST).exists():
                    log.warning("removing %s: its write was cut off (no manifest)", p)
                    _remove(p)
                else:
                    for q in p.glob(f"*{TMP_TAG}"):
                        _remove(q)
        try:
            self._write_best()
            self._prune()
        except RunError as exc:  # a read-only copy of a run can still be read
            log.warning("%s", exc)

    # -- reading -----------------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        """The complete checkpoints of this run's own folder, oldest first."""
        return [self._records[n]["path"] for n in sorted(self._records)]

    @staticmethod
    def manifest(ckpt) -> dict:
        """A checkpoint's manifest: stage, epoch, metrics, early_stopping, metrics_rows, files, variables."""
        return read_json(_resolve(ckpt)[1], "The checkpoint cannot be used; an older one can.")

    def _read_records(self) -> dict[int, dict]:
        return self._records if self.read_folder == self.folder else _scan(self.read_folder)

    def latest_good(self) -> str | None:
        """The newest checkpoint that verifies (read from ``read_folder``); damaged ones are reported
        and skipped."""
        records = self._read_records()
        candidates = [records[n]["path"] for n in sorted(records, reverse=True)]
        candidates += _legacy(self.read_folder / "last") if not candidates else []
        return self._first_good(candidates, "falling back to the previous one")

    def _first_good(self, candidates, fallback: str) -> str | None:
        for ckpt in candidates:
            if ckpt in self._bad:
                continue
            problem = verify(ckpt)
            if problem is None:
                return ckpt
            self._bad.add(ckpt)
            log.warning("checkpoint %s is unusable: %s; %s", ckpt, problem, fallback)
        return None

    def restore(self, ckpt, with_optimizer: bool = True) -> tuple[int, int]:
        """Model (and, if asked, this stage's optimizer) from ``ckpt``; returns its (stage, epoch)."""
        read_model(self.model, ckpt)  # every model weight must find its value
        prefix, mpath = _resolve(ckpt)
        objs = {"stage": self.stage, "epoch": self.epoch}
        if with_optimizer and self.optimizer is not None:
            objs["optimizer"] = self.optimizer
        tf.train.Checkpoint(**objs).read(prefix).expect_partial()
        return int(self.stage.numpy()), int(self.epoch.numpy())

    def _restore_model(self, ckpt) -> None:
        read_model(self.model, ckpt)

    def best_record(self) -> dict | None:
        """What best.json says: the best checkpoint's name, stage, epoch, val_accuracy, val_loss,
        and each stage's best (``stages``). Derived from the manifests if best.json is damaged."""
        best, stages = _best_of(self._records, self._bad)
        if best is None:
            return None
        return {**_summary(self._records[best]),
                "stages": {str(s): _summary(self._records[n]) for s, n in sorted(stages.items())}}

    def restore_best(self) -> bool:
        """The best validated weights (across stages, and across this folder and ``read_folder``);
        a damaged best is reported and the next best used. ``self.restored`` then holds the
        restored checkpoint's record (stage, epoch, metrics; None for a legacy ``best`` file)."""
        records = dict(enumerate(self._records.values()))
        if self.read_folder != self.folder:
            records.update({len(records) + i: r for i, r in enumerate(_scan(self.read_folder).values())})
        ranked = sorted((r for r in records.values() if _score(r) is not None),
                        key=lambda r: _score(r), reverse=True)
        ckpt = self._first_good([r["path"] for r in ranked], "using the next best")
        self.restored = next((r for r in ranked if r["path"] == ckpt), None) if ckpt is not None else None
        if ckpt is None:
            ckpt = self._first_good(_legacy(self.folder / "best"), "no best checkpoint")
        if ckpt is None:
            return False
        self._restore_model(ckpt)
        return True

    def restore_stage_best(self, stage: int, epoch: int | None = None) -> bool:
        """The weights of ``stage``'s best epoch (``epoch``, when the caller knows which one it is),
        for early stopping's restore after a resume. False if there is none."""
        records = self._read_records()
        if epoch is not None:
            mine = [records[n] for n in sorted(records, reverse=True)
                    if int(records[n]["stage"]) == stage and int(records[n]["epoch"]) == epoch]
        else:
            _, stages = _best_of(records, self._bad)
            mine = [records[stages[stage]]] if stage in stages else []
        ckpt = self._first_good([r["path"] for r in mine], "the stage's best cannot be restored")
        if ckpt is None:
            return False
        self._restore_model(ckpt)
        return True


def _fsync_tree(folder: Path) -> None:
    """fsync every file TensorFlow wrote (it does not), then the folders' entries."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


_TF_CAUSES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
              "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


def _as_os_error(exc: BaseException) -> BaseException:
    """TensorFlow's file errors carry the OS's reason in their text only: recover its errno."""
    if isinstance(exc, tf.errors.OpError):
        for text, code in _TF_CAUSES.items():
            if text in exc.message:
                return OSError(code, text)
        return OSError(exc.message.strip().splitlines()[-1][:300])
    return exc


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def _legacy(folder: Path) -> list[str]:
    """Checkpoint prefixes of the layout before numbered folders (``last/``, ``best/``), newest first."""
    if not (folder / "checkpoint").exists():
        return []
    mgr = tf.train.CheckpointManager(tf.train.Checkpoint(), folder, max_to_keep=100)
    return list(reversed(mgr.checkpoints))


def restore_model(model, checkpoint: str | Path) -> str:
    """Restore model weights from a run folder or its ``checkpoints`` folder (the best checkpoint,
    else the newest good one), ``.../checkpoints/last`` (the newest good one), ``.../checkpoints/best``,
    one checkpoint folder (``.../checkpoints/ckpt-000007``), or a checkpoint prefix of the older
    layout. Damaged checkpoints are reported and skipped. Returns the checkpoint used."""
    p = Path(checkpoint)
    folder, which = None, "best"
    if (p / "checkpoints").is_dir():
        folder = p / "checkpoints"
    elif p.name in ("last", "best") and _scan(p.parent):
        folder, which = p.parent, p.name
    elif p.is_dir() and _scan(p):
        folder = p
    if folder is not None and _scan(folder):
        records = _scan(folder)
        newest = [records[n]["path"] for n in sorted(records, reverse=True)]
        if which == "best":
            ranked = sorted((r for r in records.values() if _score(r) is not None), key=_score, reverse=True)
            newest = [r["path"] for r in ranked] + [c for c in newest if c not in {r["path"] for r in ranked}]
        candidates = newest
    elif (p / MANIFEST).exists():
        candidates = [str(p)]
    else:  # the older layout: best/ then last/ folders of TensorFlow checkpoints
        roots = [p / "checkpoints" / "best", p / "checkpoints" / "last", p / "best", p / "last", p]
        candidates = [c for r in roots if r.is_dir() for c in _legacy(r)]
        if not candidates and Path(str(p) + ".index").exists():
            read_model(model, str(p))
            return str(p)
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            read_model(model, ckpt)
            return ckpt
        log.warning("checkpoint %s is unusable: %s; trying an older one", ckpt, problem)
    raise NoCheckpointError(f"No usable checkpoint under {checkpoint}.")
