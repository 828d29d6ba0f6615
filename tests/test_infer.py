"""The feature-pass engines: OpenVINO gives TensorFlow's numbers, for every backbone and shape of
input, is converted again when the weights change, falls back when it cannot convert, and is
part of the feature-cache key."""
import json
import logging

import keras
import numpy as np
import openvino  # a required dependency: if it does not import, this file fails, it does not skip
import pytest

import tuneflow.recipes as registry
from tuneflow import build_backbone, finetune
from tuneflow.features import cache as fcache
from conftest import random_lite0_weights
from tuneflow.features import infer
from tuneflow.features.predict import predict
from tuneflow.recipe import RecipeError

_MEMOS: dict = {}


def run(model, *args, **kwargs):
    """infer.run with a memo per model (what a FeatureExtractor keeps), to ask which engine ran."""
    return infer.run(model, *args, memo=_MEMOS.setdefault(id(model), {}), **kwargs)


def used(model) -> str:
    return _MEMOS[id(model)]["used"]



def _pooled(name="efficientnet_lite0", size=48, taps=None):
    bb = build_backbone(name, weights=None, input_size=size)
    outs = [keras.layers.GlobalAveragePooling2D()(bb.get_layer(t).output if t else bb.output)
            for t in (taps or [None])]
    return keras.Model(bb.input, outs if taps else outs[0])


def _images(n, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _close(a, b):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=1e-3)


def test_openvino_matches_tensorflow_over_uneven_batches_of_several_arrays():
    keras.utils.set_random_seed(0)
    model = _pooled()
    parts = [_images(7, seed=1), _images(6, seed=2)]
    ref = predict(model, parts, 64)
    got = run(model, parts, 5, "openvino", weights_key="k")  # batches straddle the two arrays
    assert got.shape == ref.shape == (13, model.output.shape[-1])
    _close(got, ref)
    assert used(model) == "openvino"


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "densenet121"])
def test_openvino_converts_every_backbone(name):
    keras.utils.set_random_seed(0)
    model = _pooled(name, size=32)
    x = _images(3, size=32)
    _close(run(model, x, 2, "openvino"), predict(model, x, 8))
    assert used(model) == "openvino"


def test_openvino_several_outputs_and_a_batch_function():
    from tuneflow.backbones import get_spec
    taps = list(get_spec("efficientnet_lite0").taps)
    model = _pooled(taps=taps)
    x = _images(4)
    outs = run(model, x, 3, "openvino", map_fn=lambda b: b * 0.0)  # every image becomes black
    ref = predict(model, np.zeros_like(x), 8)
    assert isinstance(outs, list) and len(outs) == len(taps)
    for o, r in zip(outs, ref):
        _close(o, r)
    assert used(model) == "openvino"


def test_openvino_model_is_rebuilt_when_the_weights_change_and_read_back_from_disk(monkeypatch):
    keras.utils.set_random_seed(0)
    model = _pooled()
    x = _images(3)
    key0 = fcache.weights_digest(model)
    run(model, x, 4, "openvino", weights_key=key0)
    saved = list(infer.openvino_dir().glob("*.xml"))
    assert saved and all(p.with_suffix(".bin").exists() for p in saved)
    bn = next(la for la in model.layers if isinstance(la, keras.layers.BatchNormalization))
    gamma, *rest = bn.get_weights()
    bn.set_weights([gamma * 3.0, *rest])
    key1 = fcache.weights_digest(model)
    assert key1 != key0
    _close(run(model, x, 4, "openvino", weights_key=key1), predict(model, x, 8))

    # Same graph and weights in a new model object: read from disk, not converted again.
    twin = keras.Model(model.input, model.output)
    twin.set_weights(model.get_weights())

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the model is on disk")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    _close(run(twin, x, 4, "openvino", weights_key=key1), predict(model, x, 8))
    assert used(twin) == "openvino"  # not the TensorFlow fallback


def test_a_graph_openvino_cannot_convert_falls_back_to_tensorflow(monkeypatch, caplog):
    model = _pooled()
    x = _images(2)

    def fails(*a, **k):
        raise RuntimeError("unsupported operation Foo")

    monkeypatch.setattr(openvino, "convert_model", fails)
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        got = run(model, x, 4, "openvino", weights_key="never-converted")
    _close(got, predict(model, x, 8))
    assert used(model) == "tensorflow"
    assert "could not convert" in caplog.text and "unsupported operation Foo" in caplog.text


def test_a_conversion_that_computes_something_else_is_caught_and_falls_back(caplog):
    # Real case: OpenVINO 2026.4 converts Keras 3's GroupNormalization (instance norm) into constants.
    from tuneflow.training.heads import replace_batchnorm
    bb = replace_batchnorm(build_backbone("efficientnet_lite0", weights=None, input_size=32), "instance")
    model = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    x = _images(3, size=32)
    saved = infer.openvino_dir()
    before = set(saved.glob("*.xml"))
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        got = run(model, x, 2, "openvino", weights_key="gn")
    _close(got, predict(model, x, 8))
    assert used(model) == "tensorflow"
    assert "ConversionMismatch: 50 outputs where TensorFlow has 1" in caplog.text
    assert set(saved.glob("*.xml")) == before  # a wrong conversion is never kept on disk


def test_a_conversion_with_wrong_numbers_is_caught(monkeypatch, caplog):
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    model, other = _pooled(size=32), _pooled(size=32)  # same graph, other weights
    real = openvino.convert_model
    spec = tf.TensorSpec((None, 32, 32, 3), tf.float32)
    monkeypatch.setattr(openvino, "convert_model", lambda fn: real(tf.function(
        lambda images: other(images, training=False), input_signature=[spec])))
    x = _images(2, size=32)
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        got = run(model, x, 2, "openvino", weights_key="wrong")
    _close(got, predict(model, x, 8))
    assert used(model) == "tensorflow"
    assert "ConversionMismatch: output 0 at f32 differs from TensorFlow's by" in caplog.text


def test_engine_choice_and_its_errors(monkeypatch):
    assert infer.resolve_engine("tensorflow") == "tensorflow"
    assert infer.resolve_engine("auto") == "openvino"  # a CPU-only machine with OpenVINO
    with pytest.raises(ValueError, match="feature_engine='onnx' is not valid; choose one of auto, tensorflow, openvino"):
        infer.resolve_engine("onnx")
    with pytest.raises(RecipeError, match="feature_engine='onnx' is not valid"):
        registry.get("small_similar").override("feature_engine=onnx")
    monkeypatch.setattr(infer, "openvino_available", lambda: False)
    assert infer.resolve_engine("auto") == "tensorflow"
    with pytest.raises(ValueError, match="pip install openvino.*feature_engine=tensorflow"):
        infer.resolve_engine("openvino")


@pytest.mark.slow
def test_the_engine_is_part_of_the_cache_key_and_named_in_the_report(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("TUNEFLOW_HOME", str(tmp_path / "home"))  # an empty cache: no other test's features
    base = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32", "head__epochs": 2}
    before = set(fcache.cache_root().glob("*.npy")) if fcache.cache_root().exists() else set()
    reports = {}
    for engine in ("tensorflow", "openvino"):
        res = finetune("small_similar", tiny_folder, tmp_path / engine, verbose=0,
                       overrides={**base, "feature_engine": engine})
        reports[engine] = json.loads((res.run_dir / "report.json").read_text())
    new = set(fcache.cache_root().glob("*.npy")) - before
    assert len(new) == 4  # train + val per engine: neither reused the other's features
    assert reports["tensorflow"]["feature_engine"] == "tensorflow/float32"
    assert reports["openvino"]["feature_engine"] == "openvino/f32"
    assert "(openvino/f32)" in (tmp_path / "openvino" / "report.md").read_text()
    by_size = {}
    for p in new:
        by_size.setdefault(np.load(p).shape, []).append(np.load(p))
    for arrays in by_size.values():  # the two engines computed the same features
        assert len(arrays) == 2
        _close(arrays[0], arrays[1])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tensorflow", "openvino"])
def test_augmented_views_in_the_cache(tmp_path, tiny_folder, engine):
    over = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32", "head__epochs": 2,
            "cache_views": 3, "augment": "medium", "feature_engine": engine}
    before = set(fcache.cache_root().glob("*.npy")) if fcache.cache_root().exists() else set()
    res = finetune("small_similar", tiny_folder, tmp_path / "r", verbose=0, overrides=over)
    views = [np.load(p) for p in set(fcache.cache_root().glob("*.npy")) - before if np.load(p).shape[0] == 3]
    assert len(views) == 1, "one train entry holding 3 views"
    v = views[0]
    assert v.shape[1] == res.report["num_train"]
    differ = lambda a, b: np.abs(a - b).max() > 1e-2 * np.abs(a).max()  # noqa: E731 (untrained: tiny values)
    assert differ(v[0], v[1]) and differ(v[1], v[2])  # augmented, differently
    assert res.report["feature_engine"] == f"{engine}/{'float32' if engine == 'tensorflow' else 'f32'}"


def _hardware_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 on this CPU (asked of OpenVINO itself, not of tuneflow)."""
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(params=["this_cpu", "no_bf16"])
def cpu_bf16(request, monkeypatch) -> bool:
    """Runs a test on this CPU as it is, and as a CPU without bf16 arithmetic
    (``TUNEFLOW_CPU_BF16=0``); the value is whether OpenVINO will really compute in bf16."""
    if request.param == "no_bf16":
        monkeypatch.setenv("TUNEFLOW_CPU_BF16", "0")
        return False
    monkeypatch.delenv("TUNEFLOW_CPU_BF16", raising=False)
    return _hardware_bf16()


@pytest.mark.parametrize("engine", ["tensorflow", "openvino"])
def test_a_float32_extractor_under_a_bf16_run_computes_what_the_float32_artifact_computes(engine, cpu_bf16):
    """feature_precision=float32 (the default): under mixed_bfloat16 the cached features are the
    float32 ones the exported artifact will compute, the cache key says so, and the run's policy
    (global and the layers') is back afterwards. The run's own bf16 extractor: where bf16 really
    runs (TensorFlow always; OpenVINO on CPUs with bf16) it differs more from float32; where
    OpenVINO cannot (no bf16 on the CPU, or forced off) it says f32 and computes float32's numbers."""
    import keras
    from tuneflow import build_backbone
    from tuneflow.features.extractor import FeatureExtractor
    x = np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3)).astype(np.uint8)
    before = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        keras.utils.set_random_seed(0)
        b32 = build_backbone("efficientnet_lite0", weights=None, input_size=64)
        ref = np.asarray(keras.Model(b32.input, keras.layers.GlobalAveragePooling2D()(b32.output)).predict(x, verbose=0))
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        keras.utils.set_random_seed(0)
        b16 = build_backbone("efficientnet_lite0", weights=None, input_size=64)
        b16.set_weights(b32.get_weights())
        pooled = keras.Model(b16.input, keras.layers.GlobalAveragePooling2D()(b16.output))
        f32 = FeatureExtractor(pooled, engine, precision="float32")
        run = FeatureExtractor(pooled, engine)
        assert f32.describe == {"openvino": "openvino/f32", "tensorflow": "tensorflow/float32"}[engine]
        got = f32.run(x)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert all(la.dtype_policy.name == "mixed_bfloat16" for la in pooled.layers if la.weights)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        out = np.zeros((1, 6) + got.shape[1:], np.float32)
        f32.compute_into(out, x)
        np.testing.assert_allclose(out[0], got, rtol=1e-5, atol=1e-6)
        bf16_runs = engine == "tensorflow" or cpu_bf16
        mine = run.run(x)
        if bf16_runs:
            assert run.describe == {"openvino": "openvino/bf16", "tensorflow": "tensorflow/mixed_bfloat16"}[engine]
            assert np.abs(mine - ref).max() > np.abs(got - ref).max()  # bf16 differs more
            assert f32.key(split="train") != run.key(split="train")
        else:  # OpenVINO computes f32 here: it says so, and its numbers (and cache entry) are float32's
            assert run.describe == run.used == "openvino/f32"
            np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4)
            assert f32.key(split="train") == run.key(split="train")
    finally:
        keras.mixed_precision.set_global_policy(before)


@pytest.mark.slow
def test_a_bf16_run_reports_the_precision_openvino_computed_at(tmp_path, tiny_folder, cpu_bf16, monkeypatch):
    """The report names what ran: ``openvino/bf16`` only where the CPU computes bf16."""
    monkeypatch.setenv("TUNEFLOW_HOME", str(tmp_path / "home"))  # a feature pass runs (no cache hit)
    over = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(),
            "batch_size": 8, "precision": "mixed_bfloat16", "feature_precision": "run",
            "feature_engine": "openvino"}
    res = finetune("small_similar", tiny_folder, tmp_path / "r", verbose=0, overrides=over)
    want = "openvino/bf16" if cpu_bf16 else "openvino/f32"
    assert res.report["feature_engine"] == want
    assert f"({want})" in (res.run_dir / "report.md").read_text()
