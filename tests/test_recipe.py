import json

import pytest

import tuneflow.recipes as registry
from tuneflow.recipe import Recipe, RecipeError


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_recipe_validates_and_round_trips_through_json(name):
    r = registry.get(name)
    assert r.name == name and r.validate() is r
    assert Recipe.from_json(r.to_json()) == r
    assert json.loads(r.to_json())["stages"][0]["name"] == r.stages[0].name


def test_import_gives_recipe_objects():
    from tuneflow.recipes import large_similar, small_similar
    assert isinstance(small_similar, Recipe) and isinstance(large_similar, Recipe)
    assert [s.name for s in large_similar.stages] == ["head", "finetune"]


def test_overrides_are_type_checked():
    r = registry.get("large_similar").override("batch_size=16", "finetune.lr=1e-4", "stages.0.epochs=3",
                                              "taps=a,b", "weights=None", "freeze_bn=false")
    assert (r.batch_size, r.stages[1].lr, r.stages[0].epochs) == (16, 1e-4, 3)
    assert r.taps == ("a", "b") and r.weights is None and r.freeze_bn is False
    assert registry.get("small_similar").override(batch_size=8).batch_size == 8


@pytest.mark.parametrize("pair, msg", [
    ("batchsize=3", "did you mean 'batch_size'"),
    ("batch_size=abc", "expected an integer"),
    ("batch_size=0", "out of range"),
    ("augment=extreme", "choose one of none, light, medium, heavy"),
    ("resize=zoom", "resize=.zoom. is not valid; choose one of crop, squash"),
    ("backbone=resnet9", "choose one of densenet121, efficientnet_lite0, resnet50, vgg16"),
    ("head.optimizer=lbfgs", "choose one of sgd, momentum"),
    ("head.train=middle", "Bad freeze spec"),
    ("nostage.lr=1", "has stages head"),
    ("head.colour=1", "Unknown stage key"),
    ("stages.7.lr=1", "no stage '7'"),
    ("fraction=1.5", r"must be in \(0, 1\]"),
    ("freeze_bn=maybe", "expected a boolean"),
    ("noequals", "is not key=value"),
])
def test_bad_overrides_say_what_is_valid(pair, msg):
    with pytest.raises(RecipeError, match=msg):
        registry.get("small_similar").override(pair)


def test_unknown_recipe_lists_available():
    with pytest.raises(RecipeError, match="available: large_different, large_similar"):
        registry.get("medium_similar")
