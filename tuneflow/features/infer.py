"""Forward passes without gradients over arrays of images: the frozen-feature cache, the depth
probe and ``suggest``. Two engines behind one function, :func:`run`:

- ``tensorflow``: ``model.predict`` through :func:`tuneflow.training.distribute.predict`.
- ``openvino``: the same Keras model traced once, converted by OpenVINO and run by its CPU
  plugin. On a CPU, once converted, it is 1.5-1.7x faster than TensorFlow at float32 and
  2.5-2.9x at bfloat16 (Lite0 at 224 and 288 px on 2 cores, two runs of
  ``benchmarks/bench_features.py``). The feature pass is most of a cached recipe's wall time.

``auto`` picks OpenVINO when it is installed and no GPU is visible (on a GPU, TensorFlow is the
fast one), TensorFlow otherwise. Every conversion is checked against TensorFlow on two images
before it is used (a converter can return a graph that runs and computes something else); one
that fails, or cannot be converted at all, runs on TensorFlow, with a warning. The engine and its
numeric precision are part of the feature cache key and named in the report.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..home import tuneflow_home
from ..recipe import FEATURE_ENGINES as ENGINES

log = logging.getLogger("tuneflow")

# Keras dtype policy of the run -> OpenVINO's inference precision: the same arithmetic the
# TensorFlow engine would do under that policy.
OV_PRECISION = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str) -> str:
    """``auto`` -> ``openvino`` on a CPU-only machine with OpenVINO installed, else ``tensorflow``."""
    import tensorflow as tf
    if engine not in ENGINES:
        raise ValueError(f"feature_engine={engine!r} is not valid; choose one of {', '.join(ENGINES)}.")
    if engine == "openvino" and not openvino_available():
        raise ValueError("feature_engine='openvino' needs the OpenVINO runtime: `pip install openvino`, "
                         "or use --set feature_engine=tensorflow.")
    if engine == "auto":
        engine = "openvino" if openvino_available() and not tf.config.list_physical_devices("GPU") \
            else "tensorflow"
    return engine


def describe(engine: str) -> str:
    """The engine as the cache key and the report name it: ``openvino/bf16``, ``tensorflow/float32``."""
    import keras
    policy = keras.mixed_precision.global_policy().name
    return f"openvino/{OV_PRECISION.get(policy, 'f32')}" if engine == "openvino" else f"tensorflow/{policy}"


def run(model, x, batch_size: int, engine: str = "tensorflow", map_fn=None, weights_key: str | None = None):
    """Outputs of ``model`` (one array, or a list for several outputs) on ``x`` (an array, or a
    list of arrays as if concatenated), ``map_fn`` (e.g. augmentation) applied to each batch first.

    ``weights_key`` (a digest of the weights) tells when a converted OpenVINO model is stale: it
    holds the weights as constants, so it is converted again whenever the key changes; with a key,
    the converted model is also kept on disk next to the feature cache (conversion takes ~2 s).
    """
    from ..training.distribute import predict
    if engine == "openvino":
        compiled = _openvino_model(model, weights_key)
        if compiled is not None:
            return _run_openvino(compiled, x, batch_size, map_fn)
        engine = "tensorflow"  # the graph could not be converted (logged): same numbers, slower
    if engine != "tensorflow":
        raise ValueError(f"engine {engine!r}: resolve it first with resolve_engine")
    return predict(model, x, batch_size, map_fn=map_fn)


def used_engine(model) -> str:
    """``openvino`` when :func:`run` used OpenVINO for ``model``, ``tensorflow`` after a fallback."""
    memo = getattr(model, "_tuneflow_openvino", None)
    return "openvino" if memo is not None and memo[1] is not None else "tensorflow"


def openvino_dir() -> Path:
    """Checked conversions kept on disk."""
    return tuneflow_home() / "openvino"


def _graph_key(model, weights_key, hint) -> str:
    """What the converted graph depends on: weights, structure (layers; the layers and shapes of
    the outputs, in order), precision, OpenVINO version. Not the model's own (generated) name."""
    import hashlib

    import openvino as ov
    parts = [weights_key, hint, ov.__version__, str(model.inputs[0].shape),
             str([(o._keras_history.operation.name, tuple(o.shape)) for o in model.outputs]),
             ",".join(f"{type(la).__name__}:{la.name}" for la in model._flatten_layers(include_self=False))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _openvino_model(model, weights_key):
    """The compiled OpenVINO model for ``model`` (memoized on it), or None if it cannot be converted."""
    import keras
    import openvino as ov
    import tensorflow as tf

    hint = OV_PRECISION.get(keras.mixed_precision.global_policy().name, "f32")
    memo = getattr(model, "_tuneflow_openvino", None)
    if memo is not None and memo[0] == (weights_key, hint) and weights_key is not None:
        return memo[1]
    core = ov.Core()
    path = openvino_dir() / f"{_graph_key(model, weights_key, hint)}.xml" if weights_key is not None else None
    ov_model = None
    if path is not None and path.exists():
        try:
            ov_model = core.read_model(str(path))
        except Exception as exc:  # a damaged file: convert again
            log.warning("cached OpenVINO model %s unreadable (%s); converting again", path, exc)
    if ov_model is None:
        spec = tf.TensorSpec((None,) + tuple(model.inputs[0].shape[1:]), tf.float32)
        try:
            # OpenVINO reads a float32 graph (it cannot convert bfloat16 constants) and does the
            # reduced precision itself (INFERENCE_PRECISION_HINT): layers are traced as float32.
            with _float32_policies(model):
                fn = tf.function(lambda images: model(images, training=False), input_signature=[spec])
                ov_model = ov.convert_model(fn)
                _check_conversion(core, ov_model, fn, spec)
        except Exception as exc:
            log.warning("OpenVINO could not convert %s (%s: %s); using TensorFlow for it", model.name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            model._tuneflow_openvino = ((weights_key, hint), None)
            return None
        if path is not None:  # only a converted model that passed the check is kept
            _save_atomic(ov, ov_model, path)
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    model._tuneflow_openvino = ((weights_key, hint), compiled)
    return compiled


class ConversionMismatch(RuntimeError):
    """OpenVINO converted the graph, but it does not compute what TensorFlow computes."""


def _check_conversion(core, ov_model, fn, spec, tolerance: float = 1e-3):
    """Run the converted graph at float32 on two fixed random images and compare with TensorFlow.

    A converter can return a graph that runs and is wrong (OpenVINO 2026.4 turns Keras 3's
    GroupNormalization into constants): outputs that do not match within ``tolerance`` (relative,
    max-abs over the output's scale) raise :class:`ConversionMismatch`, and the caller falls back.
    """
    import tensorflow as tf
    x = np.random.default_rng(0).integers(0, 256, (2,) + tuple(spec.shape[1:])).astype(np.float32)
    ref = fn(tf.constant(x))
    ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    checker = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = checker.create_infer_request().infer(x)
    got = [np.asarray(result[p]) for p in checker.outputs]
    if len(got) != len(ref):
        raise ConversionMismatch(f"{len(got)} outputs where TensorFlow has {len(ref)}")
    for i, (g, r) in enumerate(zip(got, ref)):
        if g.shape != r.shape:
            raise ConversionMismatch(f"output {i} has shape {g.shape}, TensorFlow's {r.shape}")
        err = float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-12)
        if not err <= tolerance:
            raise ConversionMismatch(f"output {i} differs from TensorFlow's by {err:.2g} (relative)")


def _save_atomic(ov, ov_model, path):
    """xml + bin written under temporary names and renamed, bin first: a reader that finds the
    xml finds its bin; a killed run leaves no half model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".part-"))
    try:
        ov.save_model(ov_model, str(tmp / "m.xml"), compress_to_fp16=False)
        os.replace(tmp / "m.bin", path.with_suffix(".bin"))
        os.replace(tmp / "m.xml", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _float32_policies(model):
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    saved = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = "float32"
        yield
    finally:
        for layer, policy in zip(layers, saved):
            layer.dtype_policy = policy


def _batches(x, batch_size):
    """Batches over a list of arrays as if concatenated, without copying the whole."""
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    carry = []
    have = 0
    for p in parts:
        i = 0
        while i < len(p):
            take = min(batch_size - have, len(p) - i)
            carry.append(p[i:i + take])
            have += take
            i += take
            if have == batch_size:
                yield carry[0] if len(carry) == 1 else np.concatenate(carry)
                carry, have = [], 0
    if have:
        yield carry[0] if len(carry) == 1 else np.concatenate(carry)


def _run_openvino(compiled, x, batch_size, map_fn):
    import tensorflow as tf
    if map_fn is not None:
        map_fn = tf.function(map_fn)
    request = compiled.create_infer_request()
    outs = [[] for _ in compiled.outputs]
    for batch in _batches(x, batch_size):
        batch = np.asarray(batch, np.float32)
        if map_fn is not None:
            batch = np.asarray(map_fn(tf.constant(batch)), np.float32)
        result = request.infer(batch)
        for o, port in zip(outs, compiled.outputs):
            o.append(np.array(result[port]))  # a copy: the request reuses its output buffers
    arrays = [np.concatenate(o) for o in outs]
    return arrays[0] if len(arrays) == 1 else arrays
