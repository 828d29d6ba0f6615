"""The run folder: created safely, refused when it holds another run, removed if a fresh run fails.

Layout (what the later embedding export / serving / workbench read):
  run.json           status, recipe name, timestamps, the command line
  recipe.json        the resolved recipe
  metrics.csv        one row per epoch: stage, epoch, loss, accuracy, val_loss, val_accuracy, lr
  curves.png, confusion.png, report.json, report.md
  model.keras        the whole classifier (pixels 0..255 in, probabilities out)
  backbone.weights.h5, backbone.json
  checkpoints/last (newest 2: model, optimizer, stage, epoch; early-stopping state in the manifest),
  checkpoints/best (best val accuracy across stages), checkpoints/stage_best, tensorboard/
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import RunError

FIELDS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


class RunExistsError(RunError, FileExistsError):
    pass


class RunDir:
    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        self.fresh = fresh

    @classmethod
    def open(cls, out, recipe_name: str, overwrite: bool = False, resume: bool = False) -> "RunDir":
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{recipe_name}-{stamp}"
            n = 1
            while out.exists():
                n += 1
                out = Path("runs") / f"{recipe_name}-{stamp}-{n}"
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            is_run = (out / "run.json").exists()
            if resume:
                if not is_run:
                    raise RunExistsError(f"--resume: {out} is not a tuneflow run folder (no run.json).")
                return cls(out, fresh=False)
            if not overwrite:
                raise RunExistsError(
                    f"{out} already holds {'a tuneflow run' if is_run else 'files'}. Use --resume to "
                    "continue that run, --overwrite to replace it, or choose another --out.")
            if not is_run:
                raise RunExistsError(f"--overwrite refuses to delete {out}: it is not a tuneflow run "
                                     "folder (no run.json). Choose another --out.")
            print(f"--overwrite: removing the earlier run in {out}", file=sys.stderr)
            shutil.rmtree(out)
        elif resume:
            raise RunExistsError(f"--resume: there is no run in {out} to continue.")
        out.mkdir(parents=True, exist_ok=True)
        return cls(out, fresh=True)

    def __truediv__(self, name):
        return self.path / name

    def write_json(self, name: str, obj) -> Path:
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, target)
        return target

    def status(self, status: str, **extra) -> None:
        info = json.loads((self / "run.json").read_text()) if (self / "run.json").exists() else {}
        info.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        info.setdefault("command", " ".join(sys.argv))
        self.write_json("run.json", info)

    def metrics_rows(self) -> list[dict]:
        p = self / "metrics.csv"
        if not p.exists():
            return []
        with open(p) as f:
            return list(csv.DictReader(f))

    def truncate_metrics(self, keep) -> None:
        """Keep rows for which ``keep(stage_index, epoch)`` is true (used when resuming)."""
        rows = [r for r in self.metrics_rows() if keep(int(r["stage"]), int(r["epoch"]))]
        self._write_rows(rows)

    def append_metrics(self, row: dict) -> None:
        rows = self.metrics_rows() + [{k: row.get(k, "") for k in FIELDS}]
        self._write_rows(rows)

    def _write_rows(self, rows) -> None:
        tmp = self / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self / "metrics.csv")

    def discard_if_fresh(self) -> bool:
        """Remove a run that failed before it saved anything resumable."""
        has_ckpt = any((self / "checkpoints" / "last").glob("*.index")) if (
            self / "checkpoints" / "last").exists() else False
        if self.fresh and not has_ckpt:
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False
