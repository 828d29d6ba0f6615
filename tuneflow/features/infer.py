"""Forward passes without gradients over arrays of images: the frozen-feature cache, the depth
probe and ``suggest``. Two engines behind one function, :func:`run`:

- ``tensorflow``: ``model.predict`` through :func:`tuneflow.features.predict.predict`.
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

from ..errors import RecipeError, SetupError
from ..hardware import openvino_precision
from ..home import tuneflow_home
from ..recipe import FEATURE_ENGINES as ENGINES
from .predict import predict, predict_chunks, row_batches

log = logging.getLogger("tuneflow")

# Keras dtype policy of the run -> OpenVINO's inference precision: the same arithmetic the
# TensorFlow engine would do under that policy.
OV_PRECISION = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}


def openvino_available() -> bool:
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken install counts as absent
        return False


def resolve_engine(engine: str) -> str:
    """``auto`` -> ``openvino`` on a CPU-only machine with OpenVINO installed, else ``tensorflow``."""
    import tensorflow as tf
    if engine not in ENGINES:
        raise RecipeError(f"feature_engine={engine!r} is not valid; choose one of {', '.join(ENGINES)}.")
    if engine == "openvino" and not openvino_available():
        raise SetupError("feature_engine='openvino' needs the OpenVINO runtime, which does not import here: "
                         "`pip install openvino` (a core dependency of tuneflow), "
                         "or use --set feature_engine=tensorflow.")
    if engine == "auto":
        engine = "openvino" if openvino_available() and not tf.config.list_physical_devices("GPU") \
            else "tensorflow"
    return engine


def ov_hint() -> str:
    """OpenVINO's inference precision for the run's dtype policy, as this CPU really computes it:
    a ``mixed_bfloat16`` run on a CPU without bf16 arithmetic computes (and says) ``f32``."""
    import keras
    return openvino_precision(OV_PRECISION.get(keras.mixed_precision.global_policy().name, "f32"))


def describe(engine: str) -> str:
    """The engine and the precision it computes at, as the cache key and the report name it:
    ``openvino/bf16``, ``openvino/f32`` (also for a bf16 run on a CPU without bf16),
    ``tensorflow/float32``, ``tensorflow/mixed_bfloat16``."""
    import keras
    return f"openvino/{ov_hint()}" if engine == "openvino" else \
        f"tensorflow/{keras.mixed_precision.global_policy().name}"


def run(model, x, batch_size: int, engine: str = "tensorflow", map_fn=None, weights_key: str | None = None,
        memo: dict | None = None):
    """Outputs of ``model`` (one array, or a list for several outputs) on ``x`` (an array, or a
    list of arrays as if concatenated), ``map_fn`` (e.g. augmentation) applied to each batch first.

    ``weights_key`` (a digest of the weights) tells when a converted OpenVINO model is stale: it
    holds the weights as constants, so it is converted again whenever the key changes; with a key,
    the converted model is also kept on disk next to the feature cache (conversion takes ~2 s).
    ``memo``: a dict the caller owns (a :class:`~tuneflow.features.extractor.FeatureExtractor`)
    where the compiled model is kept between calls; ``memo["used"]`` says which engine ran.
    """
    memo = {} if memo is None else memo
    compiled = _engine(model, engine, weights_key, memo)
    if compiled is not None:
        return _run_openvino(compiled, x, batch_size, map_fn)
    return predict(model, x, batch_size, map_fn=map_fn)


def iter_run(model, x, batch_size: int, engine: str = "tensorflow", map_fn=None,
             weights_key: str | None = None, memo: dict | None = None):
    """:func:`run`, streamed: the outputs of consecutive rows of ``x`` (read batch by batch, never
    whole), yielded in order a few rows at a time (one array each, or a list for several outputs);
    nothing is kept after it is yielded, so a pass over a million images holds one chunk's outputs.

    OpenVINO yields each batch; TensorFlow yields chunks of a few batches from one traced
    ``predict`` function (:func:`tuneflow.features.predict.predict_chunks`)."""
    memo = {} if memo is None else memo
    compiled = _engine(model, engine, weights_key, memo)
    if compiled is not None:
        yield from _iter_openvino(compiled, x, batch_size, map_fn)
    else:
        yield from predict_chunks(model, x, batch_size, map_fn=map_fn)


def _engine(model, engine, weights_key, memo):
    """The compiled OpenVINO model when ``engine`` is openvino and the graph converts, else None
    (TensorFlow runs it); ``memo["used"]`` set to the engine that will run."""
    if engine == "openvino":
        compiled = _openvino_model(model, weights_key, memo)
        if compiled is not None:
            memo["used"] = "openvino"
            return compiled
        engine = "tensorflow"  # the graph could not be converted (logged): same numbers, slower
    if engine != "tensorflow":
        raise ValueError(f"engine {engine!r}: resolve it first with resolve_engine")
    memo["used"] = "tensorflow"
    return None


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


def _openvino_model(model, weights_key, memo: dict):
    """The compiled OpenVINO model for ``model`` (kept in ``memo``), or None if it cannot be converted.

    A converted model read back from disk is checked against TensorFlow again, at the run's own
    precision, before it is used: a damaged or stale file is converted anew."""
    import openvino as ov
    import tensorflow as tf

    hint = ov_hint()
    kept = memo.get("openvino")
    if kept is not None and kept[0] == (weights_key, hint) and weights_key is not None:
        return kept[1]
    spec = tf.TensorSpec((None,) + tuple(model.inputs[0].shape[1:]), tf.float32)
    core = ov.Core()
    path = openvino_dir() / f"{_graph_key(model, weights_key, hint)}.xml" if weights_key is not None else None
    ov_model = None
    if path is not None and path.exists():
        try:
            ov_model = core.read_model(str(path))
            with float32_policies(model):
                fn = tf.function(lambda images: model(images, training=False), input_signature=[spec])
                _check_conversion(core, ov_model, fn, spec, hint=hint)
        except Exception as exc:  # a damaged or stale file: convert again
            log.warning("cached OpenVINO model %s failed its check (%s); converting again", path,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            ov_model = None
    if ov_model is None:
        try:
            # OpenVINO reads a float32 graph (it cannot convert bfloat16 constants) and does the
            # reduced precision itself (INFERENCE_PRECISION_HINT): layers are traced as float32.
            with float32_policies(model):
                fn = tf.function(lambda images: model(images, training=False), input_signature=[spec])
                ov_model = ov.convert_model(fn)
                _check_conversion(core, ov_model, fn, spec, hint=hint)
        except Exception as exc:
            log.warning("OpenVINO could not convert %s (%s: %s); using TensorFlow for it", model.name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            memo["openvino"] = ((weights_key, hint), None)
            return None
        if path is not None:  # only a converted model that passed the check is kept
            _save_atomic(ov, ov_model, path)
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    memo["openvino"] = ((weights_key, hint), compiled)
    return compiled


class ConversionMismatch(RuntimeError):
    """OpenVINO converted the graph, but it does not compute what TensorFlow computes."""


# Relative max-abs error allowed against TensorFlow at float32: f32 conversions match to ~1e-5;
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004), accumulated over ~50 layers.
TOLERANCE = {"f32": 1e-3, "bf16": 0.1, "f16": 0.05}


def _check_conversion(core, ov_model, fn, spec, tolerance: float | None = None, hint: str = "f32"):
    """Run the converted graph on two fixed random images and compare with TensorFlow at float32:
    at float32 always, and also at the run's own precision ``hint`` when that differs.

    A converter can return a graph that runs and is wrong (OpenVINO 2026.4 turns Keras 3's
    GroupNormalization into constants): outputs that do not match within ``tolerance`` (relative,
    max-abs over the output's scale) raise :class:`ConversionMismatch`, and the caller falls back.
    """
    import tensorflow as tf
    x = np.random.default_rng(0).integers(0, 256, (2,) + tuple(spec.shape[1:])).astype(np.float32)
    ref = fn(tf.constant(x))
    ref = [np.asarray(r) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    for h in dict.fromkeys(["f32", hint]):
        checker = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": h})
        result = checker.create_infer_request().infer(x)
        got = [np.asarray(result[p], np.float32) for p in checker.outputs]
        if len(got) != len(ref):
            raise ConversionMismatch(f"{len(got)} outputs where TensorFlow has {len(ref)}")
        tol = tolerance if tolerance is not None and h == "f32" else TOLERANCE.get(h, 0.1)
        for i, (g, r) in enumerate(zip(got, ref)):
            if g.shape != r.shape:
                raise ConversionMismatch(f"output {i} has shape {g.shape}, TensorFlow's {r.shape}")
            if not np.isfinite(g).all():
                raise ConversionMismatch(f"output {i} has NaN/Inf at {h}")
            err = float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-12)
            if not err <= tol:
                raise ConversionMismatch(f"output {i} at {h} differs from TensorFlow's by {err:.2g} (relative)")


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
def float32_policies(model):
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
    return row_batches(x, batch_size)


def _iter_openvino(compiled, x, batch_size, map_fn):
    import tensorflow as tf
    if map_fn is not None:
        map_fn = tf.function(map_fn)
    request = compiled.create_infer_request()
    for batch in _batches(x, batch_size):
        batch = np.asarray(batch, np.float32)
        if map_fn is not None:
            batch = np.asarray(map_fn(tf.constant(batch)), np.float32)
        result = request.infer(batch)
        outs = [np.array(result[port]) for port in compiled.outputs]  # copies: the request reuses its buffers
        yield outs[0] if len(outs) == 1 else outs


def _run_openvino(compiled, x, batch_size, map_fn):
    outs = None
    for got in _iter_openvino(compiled, x, batch_size, map_fn):
        got = got if isinstance(got, list) else [got]
        outs = [[] for _ in got] if outs is None else outs
        for o, g in zip(outs, got):
            o.append(g)
    arrays = [np.concatenate(o) for o in outs] if outs else [np.zeros((0,), np.float32)]
    return arrays[0] if len(arrays) == 1 else arrays
