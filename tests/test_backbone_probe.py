"""tuneflow.training.backbone_probe: ``backbone=auto`` chooses among the recipe's candidates on the
training images alone, within its time bound, and hands the winner's features to the cache."""
import json

import keras
import numpy as np
import pytest

from conftest import make_image_folder, random_lite0_weights
from tuneflow.data import load_data
from tuneflow.errors import RecipeError
from tuneflow.features import cache as fcache
from tuneflow.recipes import small_similar
from tuneflow.training import backbone_probe as bp
from tuneflow.training.assemble import build
from tuneflow.training.cached import cache_extractor, cache_trainer, pooled_features, train_key
from tuneflow.training.plan import Plan


def test_the_default_recipe_chooses_its_backbone_and_a_name_pins_it():
    assert small_similar.backbone == "auto"
    assert small_similar.backbone_candidates[0] == "efficientnet_lite0"
    assert small_similar.pixels == 288  # the recipe's size, for every candidate
    assert small_similar.override(input_size=0).pixels == 224  # the first candidate's default
    assert small_similar.override("backbone=efficientnet_lite1").backbone == "efficientnet_lite1"


@pytest.mark.parametrize("pairs, said", [
    (["backbone_candidates=efficientnet_lite0,nope"], "backbone_candidates='nope' is not valid; choose one of"),
    (["backbone_candidates=efficientnet_lite0,efficientnet_lite0"], "names a backbone twice"),
    (["backbone_probe_seconds=0"], "backbone_probe_seconds=0"),
    (["backbone=nope"], "backbone='nope' is not valid; choose one of"),
])
def test_bad_candidates_and_bounds_are_refused_by_name(pairs, said):
    with pytest.raises(RecipeError, match=None) as e:
        small_similar.override(*pairs)
    assert said in str(e.value)


def test_an_empty_candidate_list_is_refused():
    from dataclasses import replace
    with pytest.raises(RecipeError, match="backbone_candidates is empty"):
        replace(small_similar, backbone_candidates=()).validate()


def test_the_probe_order_is_every_row_once_with_classes_spread_evenly():
    y = np.array([0] * 90 + [1] * 30 + [2] * 6)
    order = bp.probe_order(y, 3, seed=0)
    assert sorted(order.tolist()) == list(range(len(y)))
    for n in (12, 42, 63):  # any prefix holds each class in about its share
        counts = np.bincount(y[order[:n]], minlength=3)
        np.testing.assert_allclose(counts / n, [90 / 126, 30 / 126, 6 / 126], atol=1.5 / n + 0.02)
    assert bp._minimum(y[order], 3) < len(y)  # 8 of each (all 6 of class 2) long before the end
    assert (np.bincount(y[order[:bp._minimum(y[order], 3)]], minlength=3) >= [8, 8, 6]).all()


def test_the_cheapest_of_the_best_wins():
    probes = {"a": {"accuracy": 0.90}, "b": {"accuracy": 0.93}, "c": {"accuracy": 0.934}}
    assert bp.cheapest_of_best(probes, 0.005) == "b"
    assert bp.cheapest_of_best(probes, 0.05) == "a"
    assert bp.cheapest_of_best(probes, 0.0) == "c"


def _bundle(tmp_path, per_class=12, size=64):
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=per_class, size=48)
    return load_data(data, size)


def test_weights_none_takes_the_cheapest_candidate_without_probing(tmp_path):
    import tensorflow as tf
    r = small_similar.override(weights=None, input_size=64)
    got, info = bp.resolve_backbone(r, _bundle(tmp_path), tf.distribute.get_strategy(), "float32")
    assert got.backbone == "efficientnet_lite0" and "weights=None" in info["reason"]
    assert "probes" not in info


def test_a_weights_file_needs_a_named_backbone(tmp_path):
    import tensorflow as tf
    r = small_similar.override(weights=random_lite0_weights(), input_size=64)
    with pytest.raises(RecipeError) as e:
        bp.resolve_backbone(r, _bundle(tmp_path), tf.distribute.get_strategy(), "float32")
    assert "fits one backbone only: name it, e.g. --set backbone=efficientnet_lite0" in str(e.value)


def test_a_stored_choice_is_kept_without_probing(tmp_path):
    import tensorflow as tf
    r = small_similar.override(input_size=64)
    got, info = bp.resolve_backbone(r, _bundle(tmp_path), tf.distribute.get_strategy(), "float32",
                                    stored="efficientnet_lite2")
    assert got.backbone == "efficientnet_lite2" and info["reason"] == "chosen when the run started"


def test_the_probe_is_bounded_by_its_clock_and_the_winners_cache_is_the_runs(tmp_path):
    """A time bound far below one round: every candidate still sees MIN_PER_CLASS of each class
    (and no more than the first rounds); the winner's features of every training image are in the
    cache under the key the head stage reads, equal to what the stage would compute itself."""
    import tensorflow as tf
    bundle = _bundle(tmp_path, per_class=40)
    r = small_similar.override(input_size=64, backbone_probe_seconds=1e-6,
                               backbone_candidates="efficientnet_lite0,efficientnet_lite1")
    got, info = bp.resolve_backbone(r, bundle, tf.distribute.get_strategy(), "float32", verbose=0)
    assert got.backbone in ("efficientnet_lite0", "efficientnet_lite1") and got.backbone == info["backbone"]
    assert set(info["probes"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    assert 24 <= info["images"] < len(bundle.train)  # at least 8 of each of 3 classes, not all
    assert f"sample of {info['images']} of {len(bundle.train)}" in info["reason"]
    for p in info["probes"].values():
        assert 0 <= p["accuracy"] <= 1 and p["seconds"] > 0
    plan = Plan.make(got, bundle, tf.distribute.get_strategy(), "float32")
    asm = build(plan, None)
    _, pool = cache_trainer(got, asm.head, int(asm.feature_model.output.shape[-1]))
    ext = cache_extractor(got, pooled_features(asm, pool))
    key = train_key(plan, bundle, ext, None)
    assert fcache.exists(key)
    cached = np.load(fcache.cache_root() / f"{key}.npy")
    direct = ext.compute(bundle.train.x)
    assert cached.shape == direct.shape
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_a_run_of_the_default_recipe_reports_what_it_probed(tmp_path):
    """End to end through finetune: the run trains a concrete backbone, recipe.json records it,
    the report says what was probed and why the winner won, and a resumed run keeps the choice."""
    from tuneflow import finetune
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=10, size=48)
    out = tmp_path / "run"
    ov = {"input_size": 64, "backbone_candidates": "efficientnet_lite0,efficientnet_lite1", "precision": "float32"}
    res = finetune("small_similar", data, out, overrides=ov, verbose=0, export=False)
    choice = res.report["backbone_choice"]
    assert choice["backbone"] in ("efficientnet_lite0", "efficientnet_lite1")
    assert set(choice["probes"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    assert "cross-validated linear probe on all" in choice["reason"]
    assert choice["images"] == choice["train_images"] == res.report["num_train"]
    stored = json.loads((out / "recipe.json").read_text())
    assert stored["backbone"] == choice["backbone"]
    from tuneflow.runs.folder import RunDir
    assert RunDir.stored_recipe(out)["backbone"] == choice["backbone"]
    assert RunDir.stored_recipe(tmp_path / "nothing") is None
    keras.backend.clear_session()
