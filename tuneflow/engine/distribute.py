"""Distribution strategy and numeric precision choices."""
from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger("tuneflow")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto``: MirroredStrategy over all GPUs when there are several, else the default strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy=multiworker needs TF_CONFIG (cluster and task) in the "
                             "environment of every worker; see the README's multi-machine section.")
        json.loads(os.environ["TF_CONFIG"])
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {name!r}; choose auto, default, mirrored or multiworker.")


def cpu_supports_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str) -> str:
    """``auto``: float16 on GPUs with tensor cores, bfloat16 on CPUs with AVX512-BF16/AMX, else float32."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_float16" if cc and cc[0] >= 7 else "float32"
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"
