"""Distribution strategy and numeric precision choices."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import types

import tensorflow as tf

from ..errors import RecipeError, SetupError
from ..hardware import cpu_supports_bf16

log = logging.getLogger("tuneflow")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto``: MirroredStrategy over all GPUs when there are several, else the default strategy."""
    if name == "multiworker":
        # Created before anything else touches the TensorFlow runtime (listing devices would):
        # collective ops must be configured at start-up.
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise RecipeError(f"strategy={name!r} is not valid; choose auto, default, mirrored or multiworker.")


HOW_TF_CONFIG = ('set it on every worker, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                 '"task": {"type": "worker", "index": 0}}\' (docs: several GPUs, several machines)')


def check_tf_config(text: str | None) -> dict:
    """TF_CONFIG parsed and checked (a cluster of host:port lists, and this process's task in it), or
    a :class:`SetupError` saying what is wrong with it."""
    if not text:
        raise SetupError(f"strategy=multiworker needs TF_CONFIG (the cluster and this worker's task): {HOW_TF_CONFIG}.")
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise SetupError(f"TF_CONFIG is not valid JSON ({exc}): {text[:200]!r}; {HOW_TF_CONFIG}.") from None
    cluster, task = (cfg.get("cluster"), cfg.get("task")) if isinstance(cfg, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and v and all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise SetupError(f"TF_CONFIG's \"cluster\" must map job names to lists of host:port, got {cluster!r}; "
                         f"{HOW_TF_CONFIG}.")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise SetupError(f"TF_CONFIG's \"task\" must name one of the cluster's jobs ({', '.join(cluster)}) and an "
                         f"index in it, got {task!r}; {HOW_TF_CONFIG}.")
    return cfg


def worker_role(strategy) -> tuple[bool, int]:
    """(is_chief, task index). Only the chief writes the run folder; the other workers of a
    MultiWorkerMirroredStrategy write theirs to a temporary folder (they must still save, since
    saving is collective) and read checkpoints from the chief's folder when resuming."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return (kind == "chief") or (kind == "worker" and index == 0 and not has_chief) or kind is None, index


def worker_shard(strategy) -> tuple[int, int] | None:
    """(number of workers, this worker's index) under a MultiWorkerMirroredStrategy with several
    workers (a chief counts as worker 0), else None: what each worker passes to
    :func:`tuneflow.data.pipeline.train_dataset` so that it reads only its own share of the files."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    spec = resolver.cluster_spec().as_dict() or {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers < 2:
        return None
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    return chiefs + workers, (0 if kind == "chief" else chiefs + index)


def choose_precision(precision: str) -> str:
    """``auto``: float16 on GPUs with tensor cores, bfloat16 on CPUs with AVX512-BF16/AMX, else float32."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_float16" if cc and cc[0] >= 7 else "float32"
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"


def patch_symbolic_build(model) -> None:
    """Work around keras-team/keras#20585 (Keras 3 + MultiWorkerMirroredStrategy: ``fit`` fails in
    ``_maybe_symbolic_build``, which all-reduces the first input batch across workers only to learn
    its shapes, and cannot reduce a PerReplica there; it also fails on an uneven first batch under
    MirroredStrategy). The shapes are taken from the first local replica's slice instead; nothing
    else changes. Only for several replicas, only on this model instance."""
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync < 2 or not hasattr(model, "_symbolic_build"):
        return

    def first_local(v):
        return strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(first_local, next(it))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)


@contextlib.contextmanager
def multiworker_reduce_fixed(strategy):
    """Same issue, second failure: each step's logged loss/metrics are reduced across workers with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars. For the duration of the ``with``
    (a stage's ``fit``) and under MultiWorkerMirroredStrategy only, scalars are averaged over all
    workers with ``axis=None`` (what was meant); every other call goes to Keras's own function, and
    Keras's function is put back afterwards, whatever happened."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer  # the private module whose function is replaced
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original
