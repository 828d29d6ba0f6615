"""``finetune``: one code path behind the CLI, the Makefile and the Python API."""
from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from ..backbones import get_spec
from ..data import DataBundle, check_bundle, load_arrays, load_data, subsample
from ..data.labels import normalize_array_data
from ..errors import RecipeError, RunError
from ..recipe import Recipe
from ..runs import report as rep
from ..runs.checkpoints import Checkpoints
from ..runs.folder import RunDir
from ..runs.html import write_html
from . import assemble as asm_mod
from .distribute import choose_precision, make_strategy, worker_role
from .evaluate import evaluate
from .plan import Plan
from .stages import run_stages
from .taps import choose_tap

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
            from ..export.predictor import load
            self._predictor = load(self.run_dir)
        return self._predictor

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def predict(self, items, top: int = 1, **kwargs) -> list[dict]:
        return self.predictor.predict(items, top=top, **kwargs)

    def embed(self, items, **kwargs):
        return self.predictor.embed(items, **kwargs)


def resolve_recipe(recipe, overrides=()) -> Recipe:
    """A :class:`Recipe`, a recipe name, or the path of a recipe JSON file (``recipe.json`` of a
    run, or the best recipe a ``tuneflow search`` wrote), with ``overrides`` applied."""
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text.endswith(".json") or Path(text).is_file():
            try:
                recipe = Recipe.from_json(Path(text).read_text())
            except OSError as exc:
                raise RecipeError(f"Cannot read the recipe file {text}: {exc}.") from None
            except RecipeError:
                raise
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"{text} is not a valid recipe file: {exc}") from None
        else:
            import tuneflow.recipes as registry
            recipe = registry.get(text)
    elif not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe={recipe!r}: pass a recipe name, 'auto', a recipe JSON file or a Recipe.")
    if isinstance(overrides, dict):
        return recipe.override(**overrides)
    return recipe.override(*overrides)


def resolve_data(data, recipe: Recipe, size: int) -> DataBundle:
    """A folder, ``tfds:NAME``, ``(x, y)`` arrays (int, string or one-hot labels), a dict of
    splits, or a :class:`DataBundle` -> a bundle at ``size`` pixels."""
    if isinstance(data, DataBundle):
        side = data.train.x.shape[1] if len(data.train) else size
        if side != size:
            raise RecipeError(f"The DataBundle holds {side} px images but the recipe wants input_size={size}: "
                              f"load it with load_data(..., {size}) or --set input_size={side}.")
        return check_bundle(subsample(data, recipe.fraction, recipe.classes, recipe.seed))
    if isinstance(data, (tuple, list, dict)) and not isinstance(data, str):
        arrays, classes = normalize_array_data(data)
        bundle = load_arrays(arrays, size, recipe.val_fraction, classes=classes, resize=recipe.resize,
                             keep=recipe.classes or None)
        return check_bundle(subsample(bundle, recipe.fraction, None, recipe.seed))
    return load_data(data, size, recipe.val_fraction, recipe.fraction, recipe.classes, recipe.seed, recipe.resize)


@contextlib.contextmanager
def preserved_global_state():
    """Nothing global survives a run: Keras dtype policy, Python/NumPy/TensorFlow random state,
    matplotlib's backend are put back as they were."""
    import tensorflow as tf
    from tensorflow.python.eager import context
    policy = keras.mixed_precision.global_policy()
    py_state, np_state = random.getstate(), np.random.get_state()
    tf_seed = context.global_seed()
    try:
        import matplotlib
        backend = matplotlib.get_backend() if "matplotlib.pyplot" in __import__("sys").modules else None
    except ImportError:
        matplotlib, backend = None, None
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        random.setstate(py_state)
        np.random.set_state(np_state)
        context.set_global_seed(tf_seed)
        if tf_seed is None:
            tf.random.set_global_generator(tf.random.Generator.from_non_deterministic_state())
        if matplotlib is not None and backend is not None and matplotlib.get_backend() != backend:
            with contextlib.suppress(Exception):
                matplotlib.use(backend)


def finetune(recipe, data, out=None, *, overwrite: bool = False, resume: bool = False, force: bool = False,
             overrides=(), verbose: int = 1, export: bool = True) -> Result:
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

    >>> from tuneflow.recipes import small_similar                      # doctest: +SKIP
    >>> result = finetune(small_similar, "data/digits", overrides={"head__epochs": 5})  # doctest: +SKIP
    >>> result.report["val_accuracy"], result.predict(["some.png"])      # doctest: +SKIP
    """
    with preserved_global_state():
        return _finetune(recipe, data, out, overwrite, resume, force, overrides, verbose, export)


def _finetune(recipe, data, out, overwrite, resume, force, overrides, verbose, export=True) -> Result:
    t_start = time.time()
    suggestion = None
    if isinstance(recipe, str) and recipe == "auto":
        from ..suggest import suggest
        if isinstance(data, (DataBundle, tuple, list, dict)):
            raise RecipeError("recipe='auto' measures a folder or tfds: dataset; for arrays or a DataBundle "
                              "name the recipe (see `tuneflow recipes`).")
        suggestion = suggest(data)
        log.info("auto: %s -> %s", suggestion["reason"], suggestion["recipe"])
        log.info("auto: %s", suggestion["backbone_reason"])
        recipe = suggestion["recipe"]
        # The suggested backbone, unless the user's overrides name one (theirs come later and win).
        overrides = ({"backbone": suggestion["backbone"], **overrides} if isinstance(overrides, dict)
                     else [f"backbone={suggestion['backbone']}", *overrides])
    lr_plots = None
    if _has_auto_lr(overrides):  # `--set head.lr=auto`: an LR range test per such stage first
        from ..workbench.lr_find import resolve_auto_lr
        lr_plots = Path(tempfile.mkdtemp(prefix="tuneflow-lr-find-"))
        overrides = resolve_auto_lr(recipe, data, overrides, out=lr_plots)
    recipe = resolve_recipe(recipe, overrides)
    strategy = make_strategy(recipe.strategy)
    precision = choose_precision(recipe.precision)
    keras.mixed_precision.set_global_policy(precision)
    size = recipe.input_size or get_spec(recipe.backbone).default_size
    # Data first: a bad folder is reported before any run folder exists.
    bundle = resolve_data(data, recipe, size)
    chief, task = worker_role(strategy)
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
        run.write_json("labels.json", {str(i): c for i, c in enumerate(bundle.classes)})
        run.status("running", recipe=recipe.name, data_fingerprint=bundle.fingerprint(),
                   **({"suggest": suggestion} if suggestion else {}))
        plan = Plan.make(recipe, bundle, strategy, precision)
        if recipe.folds:
            from .kfold import cross_validate
            report = cross_validate(plan, bundle, run, verbose, resume_here, export=export)
        else:
            report, model = train_and_evaluate(plan, bundle, run, verbose, resume,
                                               read_dir=shared_dir if resume else None, export=export)
        if suggestion:
            report["suggest"] = suggestion
        report["wall_seconds"] = round(time.time() - t_start, 2)
        run.write_json("report.json", report)
        run.write_text("report.md", rep.markdown(report))
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


def train_and_evaluate(plan: Plan, bundle: DataBundle, run: RunDir, verbose, resume, read_dir=None,
                       export: bool = True):
    """Build, train every stage (resuming if asked), export and evaluate: (report, trained model)."""
    r = plan.recipe
    with plan.strategy.scope():
        backbone = asm_mod.make_backbone(plan)
    tap_scores: dict = {}
    tap = choose_tap(plan, bundle, backbone, tap_scores, _stored_tap(run) if resume else None)
    run.status("running", tap=tap)
    with plan.strategy.scope():
        asm = asm_mod.assemble(plan, backbone, tap)
    ckpts = Checkpoints(run / "checkpoints", asm.model,
                        read_folder=Path(read_dir) / "checkpoints" if read_dir is not None else None)
    resume_from = ckpts.latest_good() if resume else None
    outcome = run_stages(plan, bundle, run, asm, ckpts, resume_from, verbose)
    report = evaluate(plan, bundle, run, asm, outcome, export=export)
    report["taps"] = tap_scores or None
    if r.weights is None:
        report["advice"] = (report.get("advice") or "") + (
            " Trained from scratch (weights=None): every layer trained in every stage.")
    return report, asm.model


def _has_auto_lr(overrides) -> bool:
    from ..workbench.lr_find import is_auto_lr
    items = overrides.items() if isinstance(overrides, dict) else (
        tuple(p.split("=", 1)) if "=" in p else (p, None) for p in overrides)
    return any(is_auto_lr(k, v) for k, v in items)


def _stored_tap(run: RunDir):
    """The tap an interrupted run chose (its depth probe is not run again on resume)."""
    import json
    try:
        return json.loads((run / "run.json").read_text()).get("tap")
    except (OSError, ValueError):
        return None


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
