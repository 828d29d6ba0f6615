"""``finetune``: one code path behind the CLI, the Makefile and the Python API."""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..backbones import FreezeSpec, apply_freeze, build_backbone, get_spec, save_backbone
from ..data import DataBundle, kfold, load_data
from ..data.augment import make_augmenter
from ..data.pipeline import class_weights, train_dataset
from ..recipe import Recipe, RecipeError
from ..features import cache as fcache
from ..features import infer
from ..runs import report as rep
from ..runs.checkpoints import Checkpoints
from .distribute import choose_precision, make_strategy, patch_symbolic_build, worker_role
from .distribute import predict as dist_predict
from .heads import build_head, choose_norm, replace_batchnorm
from .optim import current_lr, make_optimizer
from ..runs.folder import RunDir

log = logging.getLogger("tuneflow")


@dataclass
class Result:
    run_dir: Path
    report: dict
    model: keras.Model | None = field(default=None, repr=False)


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
            except ValueError as exc:
                raise RecipeError(f"{text} is not a valid recipe file: {exc}") from None
        else:
            import tuneflow.recipes as registry
            recipe = registry.get(text)
    if isinstance(overrides, dict):
        return recipe.override(**overrides)
    return recipe.override(*overrides)


REP_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
INFER_BATCH = 64  # images per forward pass without gradients: ~30% faster than 32 on 2 CPU cores


def _val_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """Validation loss (mean negative log-likelihood, no regularisation or smoothing terms) and
    accuracy over exactly the validation examples, computed from predictions so that it is the
    same number under every strategy (no padded or dropped examples)."""
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return {"val_loss": float(-np.mean(np.log(p))), "val_accuracy": float(np.mean(probs.argmax(1) == y))}


def _call(model, x, chunk: int = 4096) -> np.ndarray:
    """A head on cached features, called directly: for a few thousand vectors this takes
    microseconds, where ``predict`` would build a dataset and retrace its function every epoch."""
    return np.concatenate([np.asarray(model(x[i:i + chunk], training=False), dtype=np.float32)
                           for i in range(0, len(x), chunk)])


class _EpochHook(keras.callbacks.Callback):
    """Per epoch: validation, lr into the logs, a metrics.csv row, a checkpoint, the best model
    kept, and early stopping on val_accuracy whose state (best, wait) is checkpointed too, so a
    resumed stage stops where an uninterrupted one would have.

    Runs before Keras's own callbacks (progress bar, TensorBoard, ReduceLROnPlateau), which then
    see ``val_loss``/``val_accuracy`` in the logs as if Keras had computed them.
    """

    def __init__(self, run: RunDir, ckpts: Checkpoints, stage_index: int, every_epoch: bool,
                 validate, patience: int = 0, state: dict | None = None):
        super().__init__()
        self.run, self.ckpts, self.stage_index = run, ckpts, stage_index
        # Cached-feature stages take milliseconds an epoch: checkpointing the whole model each
        # epoch would cost more than the training; they are checkpointed when the stage ends.
        self.every_epoch = every_epoch
        self.validate, self.patience = validate, patience
        state = state or {}
        self.best = state.get("best", -np.inf)
        self.best_loss = state.get("best_loss", np.inf)
        self.wait = state.get("wait", 0)
        self.best_epoch = state.get("best_epoch", 0)
        self.best_weights = None
        self.best_metrics = self.last_metrics = None  # val metrics of the best / latest epoch
        self.restored = False
        self.stopped_at = 0
        self.t0 = time.time()
        self.val_seconds = 0.0
        self.epochs_run = 0
        self.nan = False

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        t = time.time()
        logs.update(self.validate())
        self.val_seconds += time.time() - t
        lr = current_lr(self.model.optimizer)
        logs["lr"] = lr
        if not all(np.isfinite(float(v)) for k, v in logs.items() if k != "lr"):
            self.nan = True
            self.model.stop_training = True
            return
        self.run.append_metrics({"stage": self.stage_index, "epoch": epoch + 1, "lr": lr,
                                 "seconds": round(time.time() - self.t0, 3),
                                 **{k: float(v) for k, v in logs.items() if k in REP_KEYS}})
        self.last_metrics = {k: float(logs[k]) for k in ("val_loss", "val_accuracy")}
        acc, loss = float(logs["val_accuracy"]), float(logs["val_loss"])
        # The same rule as the best checkpoint: higher accuracy, or equal accuracy and lower loss.
        if acc > self.best or (acc == self.best and loss < self.best_loss):
            self.best, self.best_loss, self.best_epoch, self.wait = acc, loss, epoch + 1, 0
            self.best_metrics = dict(self.last_metrics)
            if self.patience:
                self.best_weights = self.model.get_weights()
                if self.every_epoch:
                    self.ckpts.save_stage_best(self.stage_index, epoch + 1)
        else:
            self.wait += 1
        self.epochs_run = epoch + 1
        if self.every_epoch:
            self.ckpts.save(self.stage_index, epoch + 1, {k: float(v) for k, v in logs.items()},
                            early_stopping=self.state())
        if self.patience and self.wait >= self.patience and epoch + 1 < self.params.get("epochs", 0):
            self.stopped_at = epoch + 1
            self.model.stop_training = True

    def state(self) -> dict:
        return {"best": self.best, "best_loss": self.best_loss, "wait": self.wait, "best_epoch": self.best_epoch}

    def on_train_end(self, logs=None):
        if not self.patience or self.nan or not self.best_epoch or self.best_epoch == self.epochs_run:
            return
        # The stage ends on its best epoch (from memory, or from disk after a resume).
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        elif not self.ckpts.restore_stage_best(self.stage_index):
            return
        self.restored = True
        log.info("%s; restored the stage's best epoch %d (val_accuracy %.4f)",
                 f"early stopping at epoch {self.stopped_at}" if self.stopped_at else "stage done",
                 self.best_epoch, self.best)

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs and not np.isfinite(float(logs["loss"])):
            self.nan = True


def finetune(recipe, data, out=None, *, overwrite: bool = False, resume: bool = False,
             overrides=(), verbose: int = 1) -> Result:
    """Train, evaluate, checkpoint and report a recipe on ``data``.

    Args:
      recipe: a :class:`Recipe` or a recipe name (``"small_similar"``).
      data: a folder of class folders, ``"tfds:NAME[:SPLIT]"``, or ``(x, y)`` arrays.
      out: the run folder (default ``runs/<recipe>-<timestamp>``).
      overrides: ``["key=value", ...]`` or a dict, type-checked against the recipe.

    >>> from tuneflow.recipes import small_similar                      # doctest: +SKIP
    >>> result = finetune(small_similar, "data/digits", overrides={"head__epochs": 5})  # doctest: +SKIP
    >>> result.report["val_accuracy"]                                    # doctest: +SKIP
    """
    t_start = time.time()
    recipe = resolve_recipe(recipe, overrides)
    spec = get_spec(recipe.backbone)
    size = recipe.input_size or spec.default_size
    strategy = make_strategy(recipe.strategy)
    precision = choose_precision(recipe.precision)
    keras.mixed_precision.set_global_policy(precision)
    # Data first: a bad folder is reported before any run folder exists.
    bundle = load_data(data, size, recipe.val_fraction, recipe.fraction, recipe.classes, recipe.seed,
                       recipe.resize)
    chief, task = worker_role(strategy)
    shared_dir = None
    if not chief:  # another worker: same computation, its writes go to a scratch folder
        if resume and out is None:
            raise ValueError("--resume with strategy=multiworker needs --out: every worker reads "
                             "the chief's checkpoints from that (shared) folder.")
        shared_dir = Path(out) if out is not None else None
        out, overwrite, resume_here = Path(tempfile.mkdtemp(prefix=f"tuneflow-worker{task}-")) / "run", False, False
        verbose = 0
    else:
        resume_here = resume
    run = RunDir.open(out, recipe.name, overwrite=overwrite, resume=resume_here)
    try:
        run.write_json("recipe.json", recipe.to_dict())
        run.status("running", recipe=recipe.name)
        if recipe.folds:
            report = _cross_validate(recipe, bundle, run, strategy, precision, verbose)
            model = None
        else:
            report, model = _train(recipe, bundle, run, strategy, precision, verbose, resume,
                                   read_dir=shared_dir if resume else None)
        report["wall_seconds"] = round(time.time() - t_start, 2)
        run.write_json("report.json", report)
        if not recipe.folds:
            (run / "report.md").write_text(rep.markdown(report))
        run.status("finished", val_accuracy=report["val_accuracy"])
    except BaseException as exc:
        if run.discard_if_fresh():
            log.error("run failed before anything resumable was saved; removed %s", run.path)
        else:
            run.status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        keras.mixed_precision.set_global_policy("float32")
        if not chief:
            shutil.rmtree(run.path.parent, ignore_errors=True)
    if verbose:
        _summary(report, run.path)
    return Result(run.path, report, model)


def _summary(report, path):
    line = "-" * 64
    print(line)
    print(f"tuneflow {report['recipe']} on {report['data']}  ->  {path}")
    if "folds" in report:
        print(f"  {report['folds']}-fold val accuracy {report['val_accuracy']:.4f} "
              f"± {report['val_accuracy_std']:.4f}")
    else:
        print(f"  val accuracy {report['val_accuracy']:.4f}   val loss {report['val_loss']:.4f}   "
              f"({report['num_train']} train / {report['num_val']} val, {len(report['classes'])} classes)")
        print(f"  verdict: {report['verdict']}")
    print(f"  wall time {report['wall_seconds']:.1f} s; report: {path}/report.md")
    print(line)


def _cross_validate(recipe, bundle, run, strategy, precision, verbose):
    folds = []
    for i, fold in enumerate(kfold(bundle, recipe.folds, recipe.seed)):
        t0 = time.time()
        sub = RunDir.open(run / f"fold-{i + 1}", recipe.name, overwrite=True)
        report, _ = _train(recipe, fold, sub, strategy, precision, verbose, False)
        report["wall_seconds"] = round(time.time() - t0, 2)
        sub.write_json("report.json", report)
        (sub / "report.md").write_text(rep.markdown(report))
        folds.append(report)
    accs = np.array([f["val_accuracy"] for f in folds])
    losses = np.array([f["val_loss"] for f in folds])
    first = folds[0]
    return {**{k: first[k] for k in ("recipe", "backbone", "weights", "input_size", "classes", "data")},
            "folds": recipe.folds, "val_accuracy": float(accs.mean()), "val_accuracy_std": float(accs.std()),
            "val_loss": float(losses.mean()), "val_loss_std": float(losses.std()),
            "fold_val_accuracy": accs.tolist(), "num_train": first["num_train"], "num_val": first["num_val"]}


def _taps(recipe, spec) -> list[str]:
    if not recipe.taps:
        return [None]
    if list(recipe.taps) == ["auto"]:
        return list(spec.taps)
    return list(recipe.taps)


def _train(recipe: Recipe, bundle: DataBundle, run: RunDir, strategy, precision, verbose, resume,
           read_dir=None):
    spec = get_spec(recipe.backbone)
    size = recipe.input_size or spec.default_size
    replicas = strategy.num_replicas_in_sync
    gbatch = recipe.batch_size * replicas
    norm = choose_norm(recipe.norm, recipe.batch_size)
    n_classes = len(bundle.classes)
    cw = class_weights(bundle.train.y, n_classes, recipe.class_weight)
    keras.utils.set_random_seed(recipe.seed)
    freeze_bn = recipe.freeze_bn if recipe.weights is not None else False  # from scratch: BN must learn
    with strategy.scope():
        backbone = build_backbone(recipe.backbone, weights=recipe.weights, input_size=size,
                                  freeze_bn=freeze_bn)
        if recipe.replace_backbone_bn:
            backbone = replace_batchnorm(backbone, recipe.replace_backbone_bn)
            freeze_bn = False
    taps = _taps(recipe, spec)
    tap_scores = {}
    if len(taps) > 1:
        tap = _probe_taps(recipe, bundle, backbone, taps, gbatch, norm, cw, strategy, tap_scores)
    else:
        tap = taps[0]
    feat_out = backbone.output if tap is None else backbone.get_layer(tap).output
    with strategy.scope():
        feature_model = keras.Model(backbone.input, feat_out, name="features")
        # Seeded again here: building the backbone may or may not convert weights first (it
        # draws random numbers only on a cold cache), and the head must not depend on that.
        keras.utils.set_random_seed(recipe.seed)
        head = build_head(tuple(feat_out.shape[1:]), n_classes, recipe, norm)
        model = keras.Model(backbone.input, head(feature_model.output), name=f"tuneflow_{recipe.name}")
        model.tuneflow_backbone = spec.name
    ckpts = Checkpoints(run / "checkpoints", model,
                        read_folder=Path(read_dir) / "checkpoints" if read_dir is not None else None)

    # Resume: the newest checkpoint that verifies says where to continue. (stage, epoch) means
    # "epoch epochs of stage done"; (stage + 1, 0) is written when a stage completes.
    start_stage, start_epoch, resume_from, es_state = 0, 0, None, None
    if resume:
        resume_from = ckpts.latest_good()
        if resume_from is not None:
            info = Checkpoints.manifest(resume_from)
            start_stage, start_epoch = int(info["stage"]), int(info["epoch"])
            es_state = info.get("early_stopping")
            log.info("resuming from %s (stage %d, epoch %d)", resume_from, start_stage, start_epoch)
        run.truncate_metrics(lambda s, e: s < start_stage or (s == start_stage and e <= start_epoch))

    stage_log, nan_note, train_images, train_seconds = [], None, 0, 0.0
    feature_stats: list[tuple[int, float, str]] = []  # (images, seconds, engine) of backbone passes
    last_cached = None  # (head trainer, val features) when the final stage trained on the cache
    for si, stage in enumerate(recipe.stages):
        fs = FreezeSpec.parse(stage.train)
        use_cache = fs.kind == "frozen" or (fs.kind == "top" and fs.n == 0)
        use_cache = use_cache and recipe.feature_cache and not (recipe.spatial_dropout and recipe.head == "conv")
        if si < start_stage:
            stage_log.append(_stage_info(stage, "restored", use_cache))
            continue
        with strategy.scope():
            apply_freeze(backbone, spec, stage.train, freeze_bn=freeze_bn)
        if use_cache:
            trainer, cache_model = _cache_trainer(recipe, head, feature_model)
            train_x, val_feats, steps = _cached_inputs(recipe, bundle, cache_model, spec, size, tap, gbatch,
                                                       cw, replicas, feature_stats)
            last_cached = (trainer, val_feats)
            def validate(trainer=trainer, val_feats=val_feats):
                return _val_metrics(_call(trainer, val_feats), bundle.val.y)
        else:
            trainer, last_cached = model, None
            steps = math.ceil(len(bundle.train) / gbatch)
            train_x = train_dataset(bundle.train, gbatch, augment=recipe.augment,
                                    backend=recipe.augment_backend, sampling=recipe.sampling,
                                    weights=cw, seed=recipe.seed + si, whole_batches=replicas > 1)
            def validate():
                return _val_metrics(dist_predict(model, bundle.val.x, max(gbatch, INFER_BATCH)), bundle.val.y)
        lr = stage.lr * (gbatch / recipe.batch_size if recipe.scale_lr else 1.0)
        with strategy.scope():
            opt = make_optimizer(stage, lr, steps, recipe.clipnorm)
            if recipe.label_smoothing:
                loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)
                acc = keras.metrics.CategoricalAccuracy(name="accuracy")
                train_x = _one_hot(train_x, n_classes)
            else:
                loss = keras.losses.SparseCategoricalCrossentropy()
                acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            trainer.compile(optimizer=opt, loss=loss, metrics=[acc])
            patch_symbolic_build(trainer)
            opt.build(trainer.trainable_variables)
        ckpts.bind_optimizer(opt)
        initial, state = 0, None
        if si == start_stage and resume_from is not None:
            # Mid-stage: weights and this stage's optimizer state. At a stage boundary: weights only
            # (the next stage starts a fresh optimizer).
            ckpts.restore(resume_from, with_optimizer=start_epoch > 0)
            initial, state = start_epoch, es_state
        hook = _EpochHook(run, ckpts, si, every_epoch=not use_cache, validate=validate,
                          patience=stage.patience, state=state)
        callbacks = [hook, keras.callbacks.TerminateOnNaN()]
        if stage.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.1,
                                                               patience=max(1, stage.patience // 2 or 2)))
        if not use_cache:
            callbacks.append(keras.callbacks.TensorBoard(str(run / "tensorboard" / stage.name),
                                                         write_graph=False, update_freq="epoch"))
        stopped_before = bool(state and stage.patience and state.get("wait", 0) >= stage.patience)
        if initial < stage.epochs and not stopped_before:
            t0 = time.time()
            trainer.fit(train_x, epochs=stage.epochs, initial_epoch=initial, callbacks=callbacks,
                        verbose=1 if verbose and not use_cache else 0)
            if not use_cache:
                train_seconds += time.time() - t0 - hook.val_seconds
                train_images += (hook.epochs_run - initial) * len(bundle.train)
        epochs_done = max(hook.epochs_run, initial)
        if hook.nan:
            nan_note = (f"Stage {stage.name!r} produced a NaN/inf loss and was stopped. Likely cause: "
                        + rep.nan_diagnosis(recipe, lr, (float(bundle.train.x.min()), float(bundle.train.x.max()))))
            stage_log.append(_stage_info(stage, epochs_done, use_cache))
            break
        # Stage complete (a resume starts the next one), with the metrics of the weights it ends on.
        known = hook.best_metrics if hook.restored else hook.last_metrics
        ckpts.save(si + 1, 0, known if known is not None and hook.epochs_run else validate())
        stage_log.append(_stage_info(stage, epochs_done, use_cache))

    ckpts.restore_best()  # the best validated weights across all stages, never a worse one
    return _evaluate(recipe, bundle, run, model, backbone, spec, size, gbatch, replicas, strategy,
                     precision, norm, stage_log, tap, tap_scores, nan_note, train_images, train_seconds,
                     last_cached, feature_stats), model


def _cache_trainer(recipe, head, feature_model):
    """For linear/mlp heads the cache holds pooled float32 vectors (exact, ~50x smaller than maps):
    the trainer is the head after its pooling layer, sharing its layers and weights."""
    if recipe.head == "conv":
        return head, feature_model
    pool = head.layers[0]
    cache_model = keras.Model(feature_model.input, pool(feature_model.output), name="pooled_features")
    trainer = keras.Sequential([keras.Input(cache_model.output.shape[1:])] + head.layers[1:],
                               name="head_on_cache")
    return trainer, cache_model


def _stage_info(stage, epochs_run, cache):
    return {"name": stage.name, "train": stage.train, "epochs_run": epochs_run,
            "optimizer": stage.optimizer, "lr": stage.lr, "schedule": stage.schedule, "cache": bool(cache)}


def _one_hot(ds, n):
    def f(*t):
        return (t[0], tf.one_hot(t[1], n)) + tuple(t[2:])
    return ds.map(f)


def _features_for(recipe, bundle, feature_model, spec, size, tap, stats):
    aug = make_augmenter(recipe.augment, recipe.augment_backend, size, recipe.seed) \
        if recipe.cache_views > 1 else None
    pooled = len(feature_model.output.shape) == 2
    dtype = np.float32 if pooled else np.float16  # maps are big: half precision; vectors: exact
    engine = infer.resolve_engine(recipe.feature_engine)
    digest = fcache.weights_digest(feature_model)
    # The engine and its precision are in the key: another engine's features are never reused.
    base = dict(backbone=spec.name, weights=digest, size=size, tap=tap, pooled=pooled,
                engine=infer.describe(engine))
    tr_key = fcache.cache_key(**base, data=bundle.fingerprint(), split="train", views=recipe.cache_views,
                              augment=f"{recipe.augment}/{recipe.augment_backend}")
    va_key = fcache.cache_key(**base, data=bundle.fingerprint(), split="val", views=1)
    t0 = time.time()
    joint = recipe.cache_views == 1 and not fcache.exists(tr_key) and not fcache.exists(va_key)
    if joint:
        # Both missing (a new dataset): one pass over train + val, one traced function.
        both = fcache.compute_features(feature_model, [bundle.train.x, bundle.val.x], INFER_BATCH,
                                       dtype=dtype, engine=engine, weights_key=digest)
        n_tr = len(bundle.train)
        (ftr, hit_tr), (fva, hit_va) = (fcache.cached(tr_key, lambda: both[:, :n_tr]),
                                        fcache.cached(va_key, lambda: both[:, n_tr:]))
    else:
        ftr, hit_tr = fcache.cached(tr_key, lambda: fcache.compute_features(
            feature_model, bundle.train.x, INFER_BATCH, aug, recipe.cache_views, dtype, engine, digest))
        fva, hit_va = fcache.cached(va_key, lambda: fcache.compute_features(
            feature_model, bundle.val.x, INFER_BATCH, dtype=dtype, engine=engine, weights_key=digest))
    n = len(bundle.train) + len(bundle.val) if joint else (
        (0 if hit_tr else len(bundle.train) * recipe.cache_views) + (0 if hit_va else len(bundle.val)))
    if n:
        # What actually ran: OpenVINO falls back to TensorFlow for a graph it cannot convert.
        used = infer.describe(infer.used_engine(fcache.local_model(feature_model)) if engine == "openvino"
                              else engine)
        stats.append((n, time.time() - t0, used))
        log.info("feature cache: %d images through %s (%s) in %.1f s", n, spec.name, used, time.time() - t0)
    else:
        log.info("feature cache: reused (same backbone, weights, size, tap, engine and data)")
    return ftr, fva[0]


def _cached_inputs(recipe, bundle, feature_model, spec, size, tap, gbatch, cw, replicas, stats):
    """Batches of cached training features (and the validation features, as an array)."""
    ftr, fva = _features_for(recipe, bundle, feature_model, spec, size, tap, stats)
    views = ftr.shape[0]
    x = ftr.reshape((-1,) + ftr.shape[2:])
    y = np.tile(bundle.train.y, views)
    n = len(y)
    idx = np.arange(n)
    if recipe.sampling == "balanced":
        rng = np.random.default_rng(recipe.seed)
        per = int(np.ceil(n / len(np.unique(y))))
        idx = np.concatenate([rng.choice(np.where(y == c)[0], per) for c in np.unique(y)])
    short = (-len(idx)) % gbatch
    if replicas > 1 and short:  # whole batches only: see distribute.predict for why
        idx = np.concatenate([idx, np.random.default_rng(recipe.seed).choice(idx, short)])
    parts = (x[idx], y[idx]) if cw is None else (x[idx], y[idx], cw[y[idx]])
    ds = tf.data.Dataset.from_tensor_slices(parts).shuffle(len(idx), seed=recipe.seed,
                                                           reshuffle_each_iteration=True)
    ds = ds.batch(gbatch).prefetch(tf.data.AUTOTUNE)
    return ds, fva, math.ceil(len(idx) / gbatch)


def _probe_taps(recipe, bundle, backbone, taps, gbatch, norm, cw, strategy, scores):
    """One forward pass for all taps, one linear head per tap on the cache; keep the best depth."""
    spec = get_spec(recipe.backbone)
    size = recipe.input_size or spec.default_size
    engine = infer.resolve_engine(recipe.feature_engine)
    digest = fcache.weights_digest(backbone)
    keys = [fcache.cache_key(backbone=spec.name, weights=digest, size=size, tap=t, data=bundle.fingerprint(),
                             split="probe", engine=infer.describe(engine)) for t in taps]
    computed = {}

    def all_taps():  # runs at most once: every tap comes from the same forward pass
        if not computed:
            pooled = keras.Model(backbone.input, [keras.layers.GlobalAveragePooling2D()(
                backbone.get_layer(t).output) for t in taps])
            outs = infer.run(pooled, [bundle.train.x, bundle.val.x], INFER_BATCH, engine,
                             weights_key=digest)  # one pass, no copy
            computed.update({t: np.asarray(o, np.float32) for t, o in zip(taps, outs)})
        return computed

    n_tr = len(bundle.train)
    stage = recipe.stages[0]
    for t, key in zip(taps, keys):
        f, _ = fcache.cached(key, lambda t=t: all_taps()[t], enabled=recipe.feature_cache)
        f = np.asarray(f, np.float32)
        # A linear probe on a few thousand vectors: no distribution needed (or wanted).
        with tf.distribute.get_strategy().scope():
            probe = keras.Sequential([keras.Input(f.shape[1:]), keras.layers.Dropout(recipe.dropout),
                                      keras.layers.Dense(len(bundle.classes), activation="softmax",
                                                         kernel_regularizer=keras.regularizers.L2(recipe.l2),
                                                         dtype="float32")])
            probe.compile(optimizer=keras.optimizers.Adam(stage.lr), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
        hist = probe.fit(f[:n_tr], bundle.train.y, batch_size=gbatch, epochs=stage.epochs, verbose=0,
                         validation_data=(f[n_tr:], bundle.val.y), shuffle=True,
                         sample_weight=None if cw is None else cw[bundle.train.y])
        scores[t] = float(max(hist.history["val_accuracy"]))
    best = max(taps, key=lambda t: (scores[t], taps.index(t)))
    log.info("depth probe: %s -> %s", ", ".join(f"{t} {a:.3f}" for t, a in scores.items()), best)
    print("depth probe (val accuracy): " + ", ".join(f"{t} {a:.3f}" for t, a in scores.items())
          + f" -> keeping {best}")
    return best


def _evaluate(recipe, bundle, run, model, backbone, spec, size, gbatch, replicas, strategy, precision,
              norm, stage_log, tap, tap_scores, nan_note, train_images, train_seconds, last_cached,
              feature_stats):
    if last_cached is not None and recipe.head != "conv":
        # The backbone did not change since the cache was filled: the head on the cached val
        # vectors is the same computation as the whole model on the val images.
        trainer, val_feats = last_cached
        probs = _call(trainer, val_feats)
    else:
        probs = dist_predict(model, bundle.val.x, max(gbatch, INFER_BATCH))
    y_pred = probs.argmax(1)
    val_loss, val_acc = _val_metrics(probs, bundle.val.y).values()
    table, cm = rep.per_class(bundle.val.y, y_pred, bundle.classes)
    rows = run.metrics_rows()
    verdict, advice = rep.verdict(rows)
    test_acc = None
    if bundle.test is not None and len(bundle.test):
        tp = dist_predict(model, bundle.test.x, max(gbatch, INFER_BATCH))
        test_acc = float(np.mean(tp.argmax(1) == bundle.test.y))
    if rows:
        rep.plot_curves(rows, run / "curves.png", f"{recipe.name} · {spec.name}")
    rep.plot_confusion(cm, bundle.classes, run / "confusion.png")
    model.save(run / "model.keras")
    save_backbone(backbone, run.path)
    n_cached = sum(1 for s in stage_log if s["cache"])
    return {
        "recipe": recipe.name, "backbone": spec.name, "weights": str(recipe.weights),
        "input_size": size, "tap": tap, "taps": tap_scores or None, "data": bundle.source,
        "classes": bundle.classes, "num_train": len(bundle.train), "num_val": len(bundle.val),
        "num_test": len(bundle.test) if bundle.test is not None else 0,
        "val_accuracy": val_acc, "val_loss": val_loss, "test_accuracy": test_acc,
        "per_class": table, "confusion_matrix": cm.tolist(),
        "train_counts": bundle.counts("train"), "class_weight": recipe.class_weight,
        "stages": stage_log, "epochs": len(rows), "cached_stages": n_cached,
        "strategy": type(strategy).__name__, "replicas": replicas, "per_replica_batch": recipe.batch_size,
        "global_batch": gbatch, "lr_scale": gbatch / recipe.batch_size if recipe.scale_lr else 1.0,
        "precision": precision, "norm": norm, "verdict": verdict, "advice": advice,
        "images_per_second": (train_images / train_seconds) if train_seconds else 0.0,
        "feature_engine": ", ".join(sorted({e for _, _, e in feature_stats})) if feature_stats else None,
        "feature_images_per_second": (sum(n for n, _, _ in feature_stats) / sum(t for _, t, _ in feature_stats))
        if feature_stats else None,
        "skipped_files": bundle.skipped, "leaks": bundle.leaks, "nan": nan_note,
        "selected_by": "best val_accuracy checkpoint across stages",
    }
