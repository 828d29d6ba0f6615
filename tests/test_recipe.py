import json

import pytest

import tuneflow.recipes as registry
from tuneflow.backbones import BACKBONES, FreezeSpec, get_spec
from tuneflow.recipe import Recipe, RecipeError, Stage


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
    ("backbone=resnet9", "choose one of " + ", ".join(sorted(BACKBONES))),
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


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("name", registry.NAMES)
def test_every_shipped_recipe_fits_every_backbone(name, backbone):
    r = registry.get(name).override(f"backbone={backbone}")
    spec = get_spec(backbone)
    for stage in r.stages:
        FreezeSpec.parse(stage.train).trainable_blocks(spec)  # what the engine calls: must not raise
    assert Recipe.from_json(r.to_json()) == r


def test_top_n_beyond_the_backbone_is_adapted_and_said():
    r = registry.get("large_different").override("backbone=resnet50")
    assert r.stages[1].train == "top:5"
    assert len(r.adapted) == 1 and "top:6" in r.adapted[0] and "resnet50" in r.adapted[0]
    assert r.override("head.epochs=2").adapted == r.adapted  # noted once, not again on re-validation
    assert registry.get("large_different").adapted == ()


def test_freeze_specs_a_user_sets_are_checked_against_the_backbone():
    with pytest.raises(RecipeError, match=r"finetune.train='top:7' asks for 7 blocks but resnet50 has 5 "
                                          r"\(conv1, conv2, conv3, conv4, conv5\); use top:0..top:5"):
        registry.get("large_similar").override("backbone=resnet50", "finetune.train=top:7")
    with pytest.raises(RecipeError, match=r"vgg16 has no block 'stage6'; its blocks are block1, .*block5"):
        registry.get("large_similar").override("backbone=vgg16", "finetune.train=from:stage6")
    assert registry.get("large_similar").override("backbone=vgg16", "stages.1.train=from:block4") \
        .stages[1].train == "from:block4"


@pytest.mark.parametrize("pair, msg", [
    ("head.lr=nan", r"head.lr=nan is not a finite number; use a value in \(0, 10\]"),
    ("head.lr=inf", r"head.lr=inf is not a finite number; use a value in \(0, 10\]"),
    ("head.lr=0", r"head.lr=0.0 is out of range: it must be in \(0, 10\]"),
    ("head.epochs=inf", r"head.epochs='inf' is not a finite number; use an integer in \[1, 100000\]"),
    ("head.epochs=nan", r"head.epochs='nan' is not a finite number"),
    ("head.epochs=2.5", r"head.epochs='2.5': expected an integer in \[1, 100000\]"),
    ("batch_size=inf", r"batch_size='inf' is not a finite number; use an integer in \[1, 65536\]"),
    ("dropout=nan", r"dropout=nan is not a finite number; use a value in \[0, 0.99\]"),
    ("dropout=1", r"dropout=1.0 is out of range: it must be in \[0, 0.99\]"),
    ("l2=-inf", r"l2=-inf is not a finite number"),
    ("val_fraction=1", r"val_fraction=1.0 is out of range: it must be in \(0, 1\)"),
    ("head.momentum=1", r"head.momentum=1.0 is out of range: it must be in \[0, 1\)"),
    ("head.weight_decay=nan", r"head.weight_decay=nan is not a finite number"),
    ("head.patience=-1", r"head.patience=-1 is out of range: it must be in \[0, 100000\]"),
    (("head.epochs=3", "head.warmup_epochs=5"), r"head.warmup_epochs=5.0 is out of range: it must be in "
                                                r"\[0, head.epochs=3\]"),
    ("seed=-1", r"seed=-1 is out of range"),
    ("head_hidden=0", r"head_hidden=0 is out of range: it must be in \[1, 65536\]"),
    ("input_size=16", r"input_size=16 is out of range: it must be in 0 \(the backbone's default\) or \[32, 2048\]"),
    ("input_size=4096", r"input_size=4096 is out of range"),
    ("folds=1", r"folds=1 is out of range: it must be in 0 \(off\) or \[2, 1000\]"),
    ("cache_views=0", r"cache_views=0 is out of range"),
    ("adapted=x", "written by tuneflow"),
])
def test_numbers_must_be_finite_and_in_range(pair, msg):
    with pytest.raises(RecipeError, match=msg):
        registry.get("small_similar").override(*([pair] if isinstance(pair, str) else pair))


@pytest.mark.parametrize("change, msg", [
    (lambda d: d.update(batch_size="16x"), r"batch_size='16x': expected an integer"),
    (lambda d: d.update(dropout=None), r"dropout=None: expected a number"),
    (lambda d: d["stages"][0].update(lr="fast"), r"head.lr='fast': expected a number"),
    (lambda d: d["stages"][0].update(colour=1), r"Unknown stage keys \['colour'\] in stage 'head'"),
    (lambda d: d.update(stages=[{"epochs": 3}]), r"expected an object with a 'name'"),
    (lambda d: d["stages"][0].update(epochs=float("inf")), r"head.epochs=inf is not a finite number"),
])
def test_recipe_files_are_type_checked(change, msg):
    d = json.loads(registry.get("small_similar").to_json())
    change(d)
    with pytest.raises(RecipeError, match=msg):
        Recipe.from_dict(d)


def test_directly_built_recipes_are_type_checked():
    with pytest.raises(RecipeError, match=r"batch_size='8': expected an integer"):
        Recipe("x", batch_size="8").validate()
    with pytest.raises(RecipeError, match=r"head.epochs=True: expected an integer"):
        Recipe("x", stages=(Stage("head", epochs=True),)).validate()
