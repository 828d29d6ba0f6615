"""``finetune``: one code path behind the CLI, the Makefile and the Python API."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras

from ..data import DataBundle
from ..errors import RecipeError, RunError
from ..export.predictor import load
from ..runs import names
from ..runs import report as rep
from ..runs.folder import RunDir
from ..runs.html import write_html
from ..suggest import apply_suggestion, probe_choices, suggest
from ..training.budget import Deadline, parse_budget, quality_overrides
from ..training.distribute import worker_role
from ..training.inputs import prepare, resolve_recipe
from ..training.isolation import preserved_global_state
from ..training.lr_range import is_auto_lr, resolve_auto_lr
from .kfold import cross_validate
from .one_run import train_and_evaluate

log = logging.getLogger("tuneflow")


@dataclass
class Result:
    """What ``finetune`` returns: the run folder, its report, and the model to use.

    ``result.predictor`` is what ``tuneflow.load(result.run_dir)`` returns (the exported float32
    artifact the report measured); ``predict``/``embed``/``classes`` are its shortcuts.
    ``model`` is the Keras model as trained (training precision), for further experiments.
    """
    run_dir: Path
    report: dict
    model: keras.Model | None = field(default=None, repr=False)
    _predictor: object = field(default=None, repr=False)

    @property
    def predictor(self):
        if self._predictor is None:
            self._predictor = load(self.run_dir)
        return self._predictor

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def predict(self, items, top: int = 1, **kwargs) -> list[dict]:
        return self.predictor.predict(items, top=top, **kwargs)

    def embed(self, items, **kwargs):
        return self.predictor.embed(items, **kwargs)


def finetune(recipe, data, out=None, *, overwrite: bool = False, resume: bool = False, force: bool = False,
             overrides=(), verbose: int = 1, export: bool = True, budget=None, quality: str | None = None) -> Result:
    """Train, evaluate, checkpoint, export and report a recipe on ``data``.

    Args:
      recipe: a :class:`Recipe`, a recipe name (``"small_similar"``), ``"auto"`` (``tuneflow suggest``
        picks the cell of the table from the data) or a recipe JSON file.
      data: a folder of class folders, ``"tfds:NAME[:SPLIT]"``, ``(x, y)`` arrays (labels as ints,
        strings or one-hot rows), ``{"train": (x, y), "val": (x, y)}``, or a :class:`DataBundle`.
      out: the run folder (default ``runs/<recipe>-<timestamp>``).
      overrides: ``["key=value", ...]`` or a dict (``{"head__lr": 3e-3}``), type-checked.
      resume: continue the run in ``out``; ``force`` accepts a changed recipe or data.
      export: False measures the model on training's own path and writes no ``model/`` (what
        ``tuneflow search`` trials use; ``tuneflow finetune --no-export``).
      budget: the whole run's wall time, ``"90s"``, ``"10m"``, ``"2h"`` or seconds
        (:mod:`tuneflow.training.budget`): planned to, refused when it cannot fit, stopped complete.
      quality: ``"fast"``, ``"balanced"`` (the recipe) or ``"best"``: a preset of overrides that
        ``overrides`` can still change.

    >>> from tuneflow.recipes import small_similar                      # doctest: +SKIP
    >>> result = finetune(small_similar, "data/digits", overrides={"head__epochs": 5})  # doctest: +SKIP
    >>> result.report["val_accuracy"], result.predict(["some.png"])      # doctest: +SKIP
    """
    with preserved_global_state():
        return _finetune(recipe, data, out, overwrite, resume, force, overrides, verbose, export, budget, quality)


def _finetune(recipe, data, out, overwrite, resume, force, overrides, verbose, export=True, budget=None,
              quality=None) -> Result:
    t_start = time.time()
    deadline = Deadline(parse_budget(budget), start=t_start) if budget is not None else None
    suggestion = None
    if isinstance(recipe, str) and recipe == "auto":
        if isinstance(data, (DataBundle, tuple, list, dict)):
            raise RecipeError("recipe='auto' measures a folder or tfds: dataset; for arrays or a DataBundle "
                              "name the recipe (see `tuneflow recipes`).")
        suggestion = suggest(data, **probe_choices(overrides))
        log.info("auto: %s -> %s", suggestion["reason"], suggestion["recipe"])
        log.info("auto: %s", suggestion["backbone_reason"])
        recipe, overrides = apply_suggestion(suggestion, overrides)
    if quality is not None:  # the preset first: the user's own overrides win
        preset = quality_overrides(resolve_recipe(recipe, ()), quality)
        overrides = ({**preset, **overrides} if isinstance(overrides, dict)
                     else [f"{k}={v}" for k, v in preset.items()] + list(overrides))
    lr_plots = None
    if _has_auto_lr(overrides):  # `--set head.lr=auto`: an LR range test per such stage first
        lr_plots = Path(tempfile.mkdtemp(prefix="tuneflow-lr-find-"))
        overrides = resolve_auto_lr(recipe, data, overrides, out=lr_plots)
    # Data first: a bad folder is reported before any run folder exists. A resumed run of a
    # backbone=auto recipe trains the backbone it chose when it started.
    stored = (RunDir.stored_recipe(out) or {}).get("backbone") if resume and out is not None else None
    recipe, bundle, plan = prepare(recipe, data, overrides, stored_backbone=stored, verbose=verbose,
                                   deadline=deadline)
    chief, task = worker_role(plan.strategy)
    shared_dir = None
    if not chief:  # another worker: same computation, its writes go to a scratch folder
        if resume and out is None:
            raise RunError("--resume with strategy=multiworker needs --out: every worker reads "
                           "the chief's checkpoints from that (shared) folder.")
        shared_dir = Path(out) if out is not None else None
        out, overwrite, resume_here = Path(tempfile.mkdtemp(prefix=f"tuneflow-worker{task}-")) / "run", False, False
        verbose = 0
    else:
        resume_here = resume
    run = RunDir.open(out, recipe.name, overwrite=overwrite, resume=resume_here)
    model = None
    try:
        run.start(recipe.to_dict(), bundle.fingerprint(), force=force)
        if lr_plots is not None:
            for png in sorted(lr_plots.glob("*.png")):
                run.register(png.name)
                shutil.move(str(png), str(run / png.name))
            shutil.rmtree(lr_plots, ignore_errors=True)
        run.write_json(names.LABELS, {str(i): c for i, c in enumerate(bundle.classes)})
        run.status("running", recipe=recipe.name, data_fingerprint=bundle.fingerprint(),
                   **({"suggest": suggestion} if suggestion else {}))
        if recipe.folds:
            report = cross_validate(plan, bundle, run, verbose, resume_here, export=export)
        else:
            report, model = train_and_evaluate(plan, bundle, run, verbose, resume,
                                               read_dir=shared_dir if resume else None, export=export)
        if suggestion:
            report["suggest"] = suggestion
        if plan.backbone_choice:
            report["backbone_choice"] = plan.backbone_choice
        if deadline is not None:
            report["budget"] = {**deadline.report(), "quality": quality or "balanced"}
        elif quality is not None:
            report["quality"] = quality
        report["wall_seconds"] = round(time.time() - t_start, 2)
        run.write_json(names.REPORT, report)
        run.write_text(names.REPORT_MD, rep.markdown(report))
        write_html(run)
        run.status("finished", val_accuracy=report["val_accuracy"])
    except BaseException as exc:
        if run.discard_if_fresh():
            log.error("run failed before anything resumable was saved; removed %s", run.path)
        else:
            run.status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run.close()
        if not chief:
            shutil.rmtree(run.path.parent, ignore_errors=True)
    if verbose:
        _summary(report, run.path)
    return Result(run.path, report, model)


def _has_auto_lr(overrides) -> bool:
    items = overrides.items() if isinstance(overrides, dict) else (
        tuple(p.split("=", 1)) if "=" in p else (p, None) for p in overrides)
    return any(is_auto_lr(k, v) for k, v in items)


def _summary(report, path):
    line = "-" * 64
    print(line)
    print(f"tuneflow {report['recipe']} on {report['data']}  ->  {path}")
    if "folds" in report:
        print(f"  {report['folds']}-fold val accuracy {report['fold_mean_val_accuracy']:.4f} "
              f"± {report['val_accuracy_std']:.4f}; final model: {report['final_model']}")
    print(f"  val accuracy {report['val_accuracy']:.4f}   val loss {report['val_loss']:.4f}   "
          f"({report['num_train']} train / {report['num_val']} val, {len(report['classes'])} classes)")
    fast = report.get("fast_path")
    if fast and fast.get("predictions_differing"):
        print(f"  (training's fast path, {fast['how']}: {fast['val_accuracy']:.4f}; "
              f"the figure above is the exported float32 model's)")
    print(f"  verdict: {report['verdict']} (majority-class rate {report['majority_rate']:.4f})")
    print(f"  wall time {report['wall_seconds']:.1f} s; report: {path}/report.html")
    print(line)
