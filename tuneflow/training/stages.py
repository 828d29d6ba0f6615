"""The stage runner: each recipe stage trained (on cached features or end to end), validated,
checkpointed and early-stopped, resumable after a crash."""
from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..backbones import apply_freeze
from ..data import DataBundle
from ..data.pipeline import train_dataset
from ..features.extractor import FeatureExtractor
from ..features.predict import predict as dist_predict
from ..features.cache import rows_view, split_views, weights_digest
from ..runs import report as rep
from ..runs.checkpoints import Checkpoints
from ..runs.folder import RunDir
from .assemble import Assembly
from .budget import DeadlineStop
from .cached import (cache_extractor, cache_trainer, cached_dataset, cached_features, lbfgs_fits, pooled_features,
                     uses_cache, uses_lbfgs)
from .distribute import multiworker_reduce_fixed, patch_symbolic_build, worker_shard
from . import prefix
from .optim import current_lr, make_optimizer
from .plan import Plan
from .probe import DEFAULT_GRID, fit_probe, grid_between
from .standardise import StandardisedHead, standardises
from .tblog import histograms_for_stage

log = logging.getLogger("tuneflow")

REP_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def val_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """Validation loss (mean negative log-likelihood, no regularisation or smoothing terms) and
    accuracy over exactly the validation examples, computed from predictions so that it is the
    same number under every strategy (no padded or dropped examples)."""
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0)
    return {"val_loss": float(-np.mean(np.log(p))), "val_accuracy": float(np.mean(probs.argmax(1) == y))}


# Rows of features per direct call at most: 64 MB of inputs (4,096 pooled vectors of 1280
# floats = 20 MB; 7x7x1280 half-precision maps: 535 rows).
CALL_CHUNK_BYTES = 64 << 20


_DIRECT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its traced call


def _direct_fn(model):
    """``model(x, training=False)`` as one traced graph, kept for the model's lifetime (traced once,
    or twice for a last short chunk): called eagerly, op by op, a model keeps far more of its
    intermediate tensors alive. Measured on large_different's trainable top (Lite0 blocks 3-7 on
    56x56x24 cached activations, 600 validation rows): eager in chunks of 256, 10.7 GB RssAnon;
    traced, 1.6 GB and 3.7x faster."""
    fn = _DIRECT_FNS.get(model)
    if fn is None:
        ref = weakref.ref(model)  # the entry must not keep its own key (the model) alive
        fn = tf.function(lambda t: ref()(t, training=False), reduce_retracing=True)
        _DIRECT_FNS[model] = fn
    return fn


def call_direct(model, x, chunk: int = 4096) -> np.ndarray:
    """A head (or a trainable top) on cached features, called directly through its traced graph:
    ``predict`` would build a dataset and retrace its function every epoch. Chunk by chunk (at
    most CALL_CHUNK_BYTES of inputs each); a memory-mapped cache is read with ``pread``, so its
    pages never join this process's memory."""
    src = rows_view(x)
    row_bytes = int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize
    chunk = max(1, min(chunk, CALL_CHUNK_BYTES // max(1, row_bytes)))
    fn = _direct_fn(model)
    return np.concatenate([np.asarray(fn(tf.convert_to_tensor(src[i:i + chunk])), dtype=np.float32)
                           for i in range(0, len(x), chunk)])


class EpochHook(keras.callbacks.Callback):
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
        else:
            self.wait += 1
        self.epochs_run = epoch + 1
        if self.every_epoch:
            self.ckpts.save(self.stage_index, epoch + 1, {k: float(v) for k, v in logs.items()},
                            early_stopping=self.state(), rows=self.run.metrics_history())
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
        elif not self.ckpts.restore_stage_best(self.stage_index, epoch=self.best_epoch):
            return
        self.restored = True
        log.info("%s; restored the stage's best epoch %d (val_accuracy %.4f)",
                 f"early stopping at epoch {self.stopped_at}" if self.stopped_at else "stage done",
                 self.best_epoch, self.best)

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs and not np.isfinite(float(logs["loss"])):
            self.nan = True


@dataclass
class Outcome:
    """What the stages did: the report's training part, and the fast path's final validation."""
    stages: list[dict] = field(default_factory=list)
    nan_note: str | None = None
    train_images: int = 0
    train_seconds: float = 0.0
    fast_probs: np.ndarray | None = None  # val probabilities of the trained model on its training path
    fast_path: str = ""  # what computed them (e.g. "head on cached features (openvino/bf16)")
    extractor_stats: list = field(default_factory=list)  # (images, seconds, engine) of feature passes
    model_from: dict | None = None  # which stage and epoch the final (best validated) weights are from


def stage_info(stage, train, epochs_run, cache):
    return {"name": stage.name, "train": train, "epochs_run": epochs_run,
            "optimizer": stage.optimizer, "lr": stage.lr, "schedule": stage.schedule, "cache": bool(cache)}


def _one_hot(ds, n):
    def f(*t):
        return (t[0], tf.one_hot(t[1], n)) + tuple(t[2:])
    return ds.map(f)


def _fit_head_lbfgs(plan: Plan, bundle: DataBundle, run: RunDir, trainer, ftr: np.ndarray, si: int, validate):
    """The linear head fitted to convergence on the cached features (every augmented view), its
    L2 strength chosen by cross-validation on the training features only; written into the
    head's classifier (standardisation folded into its weights). One metrics row records it."""
    t0 = time.time()
    x = ftr.reshape((-1, ftr.shape[-1])).astype(np.float32)
    y = np.tile(bundle.train.y, ftr.shape[0])
    w = None
    if plan.class_weights is not None:
        w = plan.class_weights[y]
    elif plan.recipe.sampling == "balanced":  # the same expected loss as oversampling, exactly
        counts = np.bincount(y, minlength=len(plan.classes)).astype(np.float64)
        w = (len(y) / (len(plan.classes) * np.maximum(counts, 1)))[y].astype(np.float32)
    grid = grid_between(*plan.recipe.head_c_range) if plan.recipe.head_c_range else DEFAULT_GRID
    probe = fit_probe(x, y, sample_weight=w, n_classes=len(plan.classes), seed=plan.recipe.seed, grid=grid)
    probe.write_into(trainer.layers[-1])
    p = probe.predict_proba(x)
    train_loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1))))
    val = validate()
    run.append_metrics({"stage": si, "epoch": 1, "loss": train_loss, "accuracy": float(np.mean(p.argmax(1) == y)),
                        **val, "lr": 0.0, "seconds": round(time.time() - t0, 3)})
    log.info("linear head fitted by L-BFGS (C=%g chosen by %d-fold cross-validation on train, inner "
             "accuracy %.4f): val accuracy %.4f", probe.chosen_C, probe.folds or 0,
             probe.inner_accuracy or float("nan"), val["val_accuracy"])


def resume_point(run: RunDir, resume_from: str | None) -> tuple[int, int, dict | None]:
    """(stage, epoch, early-stopping state) a run goes on from, with metrics.csv brought back to that
    point first: rows after it dropped (they are trained again), and the rows the checkpoint
    recorded that the file lost (cut, torn, emptied or deleted) written back, in order. A resumed
    run with no usable checkpoint starts over, and so does its metrics.csv."""
    if resume_from is None:
        if not run.fresh:
            run.rebuild_metrics(lambda s, e: False)
        return 0, 0, None
    info = Checkpoints.manifest(resume_from)
    stage, epoch = int(info["stage"]), int(info["epoch"])
    log.info("resuming from %s (stage %d, epoch %d)", resume_from, stage, epoch)
    known = info.get("metrics_rows")
    restored = run.rebuild_metrics(lambda s, e: s < stage or (s == stage and e <= epoch), known)
    name = Path(resume_from).name
    if restored:
        log.warning("metrics.csv: %d row%s restored from checkpoint %s (the file had lost %s: a cut or "
                    "torn write, or an emptied or deleted file)", restored, "s" * (restored != 1), name,
                    "them" if restored != 1 else "it")
    elif known is None:
        lost = _rows_missing(run.metrics_history(), stage, epoch)
        if lost:
            log.warning("metrics.csv: at least %d row%s missing up to stage %d epoch %d, which cannot be "
                        "restored: checkpoint %s records no metrics rows (written by an earlier tuneflow)",
                        lost, "s" * (lost != 1), stage, epoch, name)
        else:
            log.info("checkpoint %s records no metrics rows (written by an earlier tuneflow): rows "
                     "metrics.csv lost cannot be restored; none is missing that can be told", name)
    return stage, epoch, info.get("early_stopping")


def _rows_missing(rows: list[dict], stage: int, epoch: int) -> int:
    """A lower bound on the rows missing before (stage, epoch): every finished stage wrote rows
    1..its last epoch (at least one), and the resumed stage rows 1..epoch."""
    have = {(int(r["stage"]), int(r["epoch"])) for r in rows}
    missing = 0
    for s in range(stage + (epoch > 0)):
        last = epoch if s == stage else max([e for t, e in have if t == s], default=1)
        missing += sum((s, e) not in have for e in range(1, last + 1))
    return missing


def run_stages(plan: Plan, bundle: DataBundle, run: RunDir, asm: Assembly, ckpts: Checkpoints,
               resume_from: str | None, verbose: int) -> Outcome:
    """Train every stage from the resume point on; the model ends on the best validated weights."""
    r, strategy = plan.recipe, plan.strategy
    start_stage, start_epoch, es_state = resume_point(run, resume_from)
    out = Outcome()
    extractor = None
    last_cached = None  # (trainer, val features) when the final stage trained on the cache
    n_classes = len(plan.classes)
    for si, stage in enumerate(r.stages):
        train = plan.stage_train(stage)
        use_cache = uses_cache(plan, stage)
        std_head = None  # a linear head trained on standardised cached features, folded at the end
        prefix_x = None  # the cached prefix activations, when the stage trains only its top
        lbfgs = False  # the linear head fitted by L-BFGS on the cached features
        if si < start_stage:
            out.stages.append(stage_info(stage, train, "restored", use_cache))
            continue
        if plan.deadline is not None and si > 0 and not plan.deadline.stage_can_start():
            plan.deadline.notes.append(f"stage {stage.name!r} and any after it skipped: {plan.deadline.left():.0f} s "
                                       f"of the budget left, {plan.deadline.reserve:.0f} s kept for the export")
            log.warning("budget: %s", plan.deadline.notes[-1])
            out.stages.append({**stage_info(stage, train, 0, use_cache), "skipped": "budget"})
            break
        t_stage = time.time()
        with strategy.scope():
            apply_freeze(asm.backbone, plan.spec, train, freeze_bn=plan.freeze_bn)
        if use_cache:
            trainer, pool = cache_trainer(r, asm.head, int(asm.feature_model.output.shape[-1]))
            feat_model = pooled_features(asm, pool)
            if extractor is None or extractor.weights_key != _digest(feat_model):
                extractor = cache_extractor(r, feat_model)
            ftr, val_feats = cached_features(plan, bundle, extractor, asm.tap)
            views = ftr.shape[0]
            train_x, steps = cached_dataset(plan, ftr.reshape((-1,) + ftr.shape[2:]),
                                            np.tile(bundle.train.y, views), r.seed)
            last_cached = (trainer, val_feats)  # the plain head: after the stage, folded weights
            lbfgs = uses_lbfgs(plan) and lbfgs_fits(ftr)
            if standardises(r) and not lbfgs:
                with strategy.scope():
                    std_head = StandardisedHead(r, trainer, ftr)
                trainer = std_head.trainer

            def validate(trainer=trainer, val_feats=val_feats):
                return val_metrics(call_direct(trainer, val_feats), bundle.val.y)
        else:
            trainer, last_cached = asm.model, None
            split = prefix.choose(plan, asm, stage, len(bundle.train), len(bundle.val))
            if split is not None:  # the frozen prefix's activations cached: only the top trains
                acts, val_acts = prefix.activations(plan, bundle, split, stage, FeatureExtractor)
                trainer = split.top
                train_x, steps = cached_dataset(plan, split_views(acts), bundle.train.y, r.seed + si, dtype=np.float32)
                prefix_x = acts[0]
                log.info("stage %s: frozen prefix cached at %s %s (%d views); training %d of %d layers",
                         stage.name, split.boundary, split.shape, acts.shape[0], len(split.top.layers),
                         len(asm.model.layers))

                def validate(trainer=trainer, val_acts=val_acts):
                    return val_metrics(call_direct(trainer, val_acts, chunk=256), bundle.val.y)
            else:
                prefix_x = None
                shard = worker_shard(strategy)  # several workers: each reads only its own files
                steps = math.ceil(len(bundle.train) / plan.global_batch)
                if shard is not None:  # each local batch is split across all replicas: shard[0] steps a batch
                    steps = shard[0] * math.ceil(math.ceil(len(bundle.train) / shard[0]) / plan.global_batch)
                    log.info("worker %d of %d reads its own %d of %d training images an epoch",
                             shard[1], shard[0], math.ceil(len(bundle.train) / shard[0]), len(bundle.train))
                train_x = train_dataset(bundle.train, plan.global_batch, augment=r.augment,
                                        backend=r.augment_backend, sampling=r.sampling,
                                        weights=plan.class_weights, seed=r.seed + si,
                                        whole_batches=plan.replicas > 1, shard=shard)

                def validate():
                    return val_metrics(dist_predict(asm.model, bundle.val.x, max(plan.global_batch, 64)),
                                       bundle.val.y)
        if lbfgs:
            if si == start_stage and resume_from is not None and start_epoch > 0:
                ckpts.restore(resume_from, with_optimizer=False)
            _fit_head_lbfgs(plan, bundle, run, trainer, ftr, si, validate)
            ckpts.save(si + 1, 0, validate(), rows=run.metrics_history())
            out.stages.append({**stage_info(stage, train, 1, use_cache), "optimizer": "lbfgs",
                               "lr": 0.0, "schedule": "converged"})
            if plan.deadline is not None:
                plan.deadline.parts[f"stage {stage.name}"] = time.time() - t_stage
            continue
        lr = plan.stage_lr(stage)
        with strategy.scope():
            opt = make_optimizer(stage, lr, steps, r.clipnorm)
            if r.label_smoothing:
                loss = keras.losses.CategoricalCrossentropy(label_smoothing=r.label_smoothing)
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
        hook = EpochHook(run, ckpts, si, every_epoch=not use_cache, validate=validate,
                         patience=stage.patience, state=state)
        callbacks = [hook, keras.callbacks.TerminateOnNaN()]
        if plan.deadline is not None:
            callbacks.append(DeadlineStop(plan.deadline, stage.name))
        if stage.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.1,
                                                               patience=max(1, stage.patience // 2 or 2)))
        if not use_cache:
            callbacks.append(keras.callbacks.TensorBoard(str(run / "tensorboard" / stage.name),
                                                         write_graph=False, update_freq="epoch"))
        if r.tensorboard_histograms:
            callbacks.append(histograms_for_stage(
                plan, run / "tensorboard" / stage.name / "histograms", trainer, asm,
                ftr[0] if use_cache else (bundle.train.x if prefix_x is None else prefix_x), bundle.train.y,
                one_hot=n_classes if r.label_smoothing else 0, start=None if prefix_x is None else split.boundary))
        if std_head is not None:
            std_head.begin()  # the classifier's weights as they are now (restored, if resumed)
        stopped_before = bool(state and stage.patience and state.get("wait", 0) >= stage.patience)
        if initial < stage.epochs and not stopped_before:
            t0 = time.time()
            with multiworker_reduce_fixed(strategy):
                trainer.fit(train_x, epochs=stage.epochs, initial_epoch=initial, callbacks=callbacks,
                            verbose=1 if verbose and not use_cache else 0)
            if not use_cache:
                out.train_seconds += time.time() - t0 - hook.val_seconds
                out.train_images += (hook.epochs_run - initial) * len(bundle.train)
        epochs_done = max(hook.epochs_run, initial)
        if std_head is not None and not hook.nan:
            std_head.fold()  # the stage's weights (its best epoch, if restored) into the model
        if hook.nan:
            out.nan_note = (f"Stage {stage.name!r} produced a NaN/inf loss and was stopped. Likely cause: "
                            + rep.nan_diagnosis(r, lr, (float(bundle.train.x.min()), float(bundle.train.x.max()))))
            out.stages.append(stage_info(stage, train, epochs_done, use_cache))
            break
        # Stage complete (a resume starts the next one), with the metrics of the weights it ends on.
        known = hook.best_metrics if hook.restored else hook.last_metrics
        ckpts.save(si + 1, 0, known if known is not None and hook.epochs_run else validate(),
                   rows=run.metrics_history())
        info = stage_info(stage, train, epochs_done, use_cache)
        if prefix_x is not None:
            info["prefix_cache"] = {"boundary": split.boundary, "shape": list(split.shape),
                                    "views": int(acts.shape[0])}
        out.stages.append(info)
        if plan.deadline is not None:
            plan.deadline.parts[f"stage {stage.name}"] = time.time() - t_stage

    ckpts.restore_best()  # the best validated weights across all stages, never a worse one
    out.model_from = model_from(ckpts.restored, r.stages)
    if last_cached is not None:
        # The backbone did not change since the cache was filled: the head on the cached val
        # vectors is what training measured (features from the fast engine, e.g. OpenVINO bf16).
        trainer, val_feats = last_cached
        out.fast_probs = call_direct(trainer, val_feats)
        out.fast_path = f"head on cached features ({extractor.used})"
    else:
        out.fast_probs = dist_predict(asm.model, bundle.val.x, max(plan.global_batch, 64))
        out.fast_path = f"Keras model under {plan.precision}"
    out.extractor_stats = list(extractor.stats) if extractor is not None else []
    return out


def model_from(record: dict | None, stages) -> dict | None:
    """Which stage (its name and index) and epoch a checkpoint record holds. A stage's end is saved
    as (its index + 1, epoch 0): reported as that stage, ``"epoch": "end"``."""
    if not record:
        return None
    k, e = int(record["stage"]), int(record["epoch"])
    i = k - 1 if e == 0 and k > 0 else k
    if not 0 <= i < len(stages):
        return None
    m = record.get("metrics") or {}
    return {"stage": stages[i].name, "index": i, "epoch": "end" if e == 0 else e,
            "val_accuracy": m.get("val_accuracy"), "val_loss": m.get("val_loss")}


def _digest(model) -> str:
    return weights_digest(model)
