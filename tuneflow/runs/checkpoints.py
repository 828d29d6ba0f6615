"""Checkpoints that survive anything: atomic, verified, resumable, strategy-independent.

``RUN/checkpoints/last/`` holds the newest ``max_to_keep`` training checkpoints
(model, optimizer with its slot variables, stage, epoch); ``RUN/checkpoints/best/``
holds the best one by the monitored metric, replaced only by a better one. Each
checkpoint gets a manifest (sha256 of its files and the model's variable shapes),
written after the data and renamed into place: a truncated or corrupted
checkpoint is detected, reported with its path, and the previous good one is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from ..errors import RunError

log = logging.getLogger("tuneflow")


class CheckpointMismatchError(RunError, ValueError):
    """The checkpoint was written for a different backbone or head."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(prefix: str) -> list[Path]:
    p = Path(prefix)
    return sorted(f for f in p.parent.glob(p.name + ".*") if not f.name.endswith(".manifest.json"))


def variable_shapes(model) -> dict[str, list[int]]:
    """``layer/variable -> shape``. Keyed by the innermost layer's name (unique in a tuneflow model),
    not ``v.path``, which differs between a freshly built model and a reloaded ``model.keras``."""
    return {"/".join(v.path.split("/")[-2:]): [int(d) for d in v.shape] for v in model.weights}


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_manifest(prefix: str, model, extra: dict | None = None) -> None:
    manifest = {"files": {f.name: _sha256(f) for f in _files(prefix)},
                "variables": variable_shapes(model), **(extra or {})}
    _write_json_atomic(Path(prefix + ".manifest.json"), manifest)


def verify(prefix: str) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    mpath = Path(prefix + ".manifest.json")
    if not mpath.exists():
        return "no manifest (the write was cut off)"
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError:
        return "unreadable manifest"
    for name, digest in manifest["files"].items():
        f = Path(prefix).parent / name
        if not f.exists():
            return f"missing file {f}"
        if _sha256(f) != digest:
            return f"file {f} is truncated or corrupted (checksum mismatch)"
    return None


def check_compatible(prefix: str, model) -> None:
    """Raise a readable error naming every variable whose presence or shape differs."""
    manifest = json.loads(Path(prefix + ".manifest.json").read_text())
    saved, ours = manifest["variables"], variable_shapes(model)
    # shape mismatches first: they say most about what differs
    problems = [f"  {k}: checkpoint {saved[k]} vs model {ours[k]}"
                for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
    problems += [f"  {k}: in this model {ours[k]}, not in the checkpoint" for k in sorted(set(ours) - set(saved))]
    problems += [f"  {k}: in the checkpoint {saved[k]}, not in this model" for k in sorted(set(saved) - set(ours))]
    if problems:
        shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointMismatchError(
            f"Checkpoint {prefix} does not fit this model ({len(problems)} mismatching variables):\n"
            + "\n".join(shown) + "\nRestore it into the backbone, input size and head it was "
            "trained with (see the run's recipe.json).")


class Checkpoints:
    """Last-N and best checkpoints of one run."""

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
        self.best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), self.folder / "best",
                                               max_to_keep=1)
        self.best_json = self.folder / "best" / "best.json"
        # The best epoch of the running stage, for early stopping's restore after a resume.
        self.stage_best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                                     self.folder / "stage_best", max_to_keep=1)
        if self.read_folder != self.folder:
            self._read_last = tf.train.CheckpointManager(tf.train.Checkpoint(), self.read_folder / "last", 100)
            self._read_stage_best = tf.train.CheckpointManager(tf.train.Checkpoint(),
                                                               self.read_folder / "stage_best", 1)
        else:
            self._read_last = self._read_stage_best = None

    def bind_optimizer(self, optimizer) -> None:
        """Each stage has its own optimizer: checkpoints from now on carry this one's state."""
        objs = {"model": self.model, "stage": self.stage, "epoch": self.epoch}
        if optimizer is not None:
            objs["optimizer"] = optimizer
        self.ckpt = tf.train.Checkpoint(**objs)
        self.last = tf.train.CheckpointManager(self.ckpt, self.folder / "last", max_to_keep=self.max_to_keep)

    def save(self, stage: int, epoch: int, metrics: dict | None = None,
             early_stopping: dict | None = None) -> str:
        """A training checkpoint: (stage, epoch) means "epoch epochs of stage done"."""
        self.stage.assign(stage)
        self.epoch.assign(epoch)
        prefix = self.last.save()
        extra = {"stage": stage, "epoch": epoch}
        if early_stopping is not None:
            extra["early_stopping"] = early_stopping
        write_manifest(prefix, self.model, extra)
        if metrics is not None:
            self.maybe_save_best(stage, epoch, metrics)
        return prefix

    @staticmethod
    def manifest(prefix: str) -> dict:
        return json.loads(Path(prefix + ".manifest.json").read_text())

    def save_stage_best(self, stage: int, epoch: int) -> str:
        prefix = self.stage_best.save()
        write_manifest(prefix, self.model, {"stage": stage, "epoch": epoch})
        return prefix

    def restore_stage_best(self, stage: int) -> bool:
        prefix = self.latest_good(self._read_stage_best or self.stage_best)
        if prefix is None or self.manifest(prefix).get("stage") != stage:
            return False
        check_compatible(prefix, self.model)
        tf.train.Checkpoint(model=self.model).restore(prefix).expect_partial()
        return True

    def best_record(self) -> dict | None:
        return json.loads(self.best_json.read_text()) if self.best_json.exists() else None

    def maybe_save_best(self, stage: int, epoch: int, metrics: dict) -> bool:
        acc, loss = metrics.get("val_accuracy"), metrics.get("val_loss")
        if acc is None or not np.isfinite(loss if loss is not None else 0.0):
            return False
        rec = self.best_record()
        if rec is not None and (acc < rec["val_accuracy"] or (
                acc == rec["val_accuracy"] and loss >= rec["val_loss"])):
            return False  # never replace the best by a worse one
        prefix = self.best.save()
        write_manifest(prefix, self.model)
        _write_json_atomic(self.best_json, {"val_accuracy": float(acc), "val_loss": float(loss),
                                            "stage": stage, "epoch": epoch, "prefix": prefix})
        return True

    def latest_good(self, manager=None) -> str | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        manager = manager or self._read_last or self.last
        for prefix in reversed(manager.checkpoints):
            problem = verify(prefix)
            if problem is None:
                return prefix
            log.warning("checkpoint %s is unusable: %s; falling back to the previous one", prefix, problem)
        return None

    def restore(self, prefix: str, with_optimizer: bool = True) -> tuple[int, int]:
        check_compatible(prefix, self.model)
        if with_optimizer:
            self.ckpt.restore(prefix).expect_partial()
        else:
            tf.train.Checkpoint(model=self.model, stage=self.stage, epoch=self.epoch).restore(
                prefix).expect_partial()
        return int(self.stage.numpy()), int(self.epoch.numpy())

    def restore_best(self) -> bool:
        prefix = self.latest_good(self.best)
        if prefix is None:
            return False
        check_compatible(prefix, self.model)
        tf.train.Checkpoint(model=self.model).restore(prefix).expect_partial()
        return True


def restore_model(model, checkpoint: str | Path) -> str:
    """Restore model weights from a run folder, a checkpoints folder or a checkpoint prefix."""
    p = Path(checkpoint)
    candidates = [p / "checkpoints" / "best", p / "checkpoints" / "last", p / "best", p / "last", p]
    for folder in candidates:
        if folder.is_dir() and tf.train.latest_checkpoint(str(folder)):
            mgr = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, max_to_keep=100)
            for prefix in reversed(mgr.checkpoints):
                problem = verify(prefix)
                if problem is None:
                    check_compatible(prefix, model)
                    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
                    return prefix
                log.warning("checkpoint %s is unusable: %s; trying an older one", prefix, problem)
    if Path(str(p) + ".index").exists():
        check_compatible(str(p), model)
        tf.train.Checkpoint(model=model).restore(str(p)).expect_partial()
        return str(p)
    raise FileNotFoundError(f"No usable checkpoint under {checkpoint}.")
