"""Every stage of every recipe on every backbone: valid, and trains what it says (issue: recipes valid for every backbone)."""
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import make_image_folder
from tuneflow import BACKBONES, build_backbone, finetune
from tuneflow.backbones import apply_freeze, get_spec
from tuneflow.training.plan import Plan


@pytest.fixture(scope="module")
def backbones():
    return {name: build_backbone(name, weights=None, input_size=32) for name in sorted(BACKBONES)}


@pytest.mark.parametrize("recipe_name", registry.NAMES)
def test_every_stage_freezes_real_blocks_of_every_backbone(backbones, recipe_name):
    for name, model in backbones.items():
        recipe = registry.get(recipe_name).override(backbone=name)
        spec = get_spec(name)
        for stage in recipe.stages:
            blocks = apply_freeze(model, spec, stage.train)
            trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            if stage.train == "frozen":
                assert blocks == [] and trainable == 0, (name, stage.name)
            else:
                assert blocks and set(blocks) <= set(spec.block_names), (name, stage.name, blocks)
                assert trainable > 0, (name, stage.name)


def test_weights_none_trains_every_layer_in_every_stage():
    import tensorflow as tf
    recipe = registry.get("large_different").override(weights=None)
    bundle = type("B", (), {"classes": ["a", "b"], "train": type("S", (), {"y": np.array([0, 1])})()})()
    plan = Plan.make(recipe, bundle, tf.distribute.get_strategy(), "float32")
    assert plan.from_scratch and all(plan.stage_train(s) == "all" for s in recipe.stages)


@pytest.mark.slow
@pytest.mark.parametrize("name, pretrained", [("resnet50", True), ("vgg16", False)])
def test_large_different_runs_both_stages_on_deeper_and_shallower_backbones(tmp_path, backbones, name, pretrained):
    """ResNet50 from a weights file (the pretrained path: head on cached features, then the top
    blocks; from scratch it took ~500 s of a loaded suite, writing every variable's Adam slots at
    each checkpoint), VGG16 from scratch (every layer trains in every stage)."""
    weights = None
    if pretrained:
        from tuneflow import save_backbone
        weights = str(save_backbone(backbones[name], tmp_path / "w", name))
    data = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("large_different", data, tmp_path / "r", verbose=0,
                   overrides={"backbone": name, "weights": weights, "input_size": 32, "batch_size": 4,
                              "head__epochs": 1, "finetune__epochs": 1, "precision": "float32"})
    assert [s["epochs_run"] for s in res.report["stages"]] == [1, 1]
    stages = registry.get("large_different").stages
    if pretrained:
        assert not res.report["from_scratch"]
        # the recipe's top:6 is capped to the blocks ResNet50 has (top:5)
        assert [s["train"] for s in res.report["stages"]] == ["frozen", "top:5"] and stages[1].train == "top:6"
    else:
        assert res.report["from_scratch"] and all(s["train"] == "all" for s in res.report["stages"])
