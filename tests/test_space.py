"""The default search space: derived from what each recipe trains, so `tuneflow search RECIPE` runs
at every recipe's defaults (and `auto`'s), without the keys --set pins; an empty space is an error
that names the recipe."""
import csv
import json
import random
import subprocess
import sys

import pytest

import tuneflow.recipes as registry
from conftest import REPO, fast_overrides, make_image_folder
from tuneflow.errors import RecipeError, RunError
from tuneflow.recipe import Recipe
from tuneflow.suggest import apply_suggestion, probe_choices, suggest
from tuneflow.training.inputs import resolve_recipe
from tuneflow.training.probe import DEFAULT_GRID, grid_between
from tuneflow.workbench.search import search
from tuneflow.workbench.space import default_space, fmt, load_space, own_point

DIGITS = REPO / "data" / "digits"  # committed (data/make_digits.py remakes it): absent is a failure
LBFGS_KEYS = {"backbone", "input_size", "resize", "cache_views", "head", "head_c_range"}
NAMES = [*registry.NAMES, "auto"]


def _fast_sets(name: str) -> list[str]:
    """A tiny trial (Lite0 with random weights at 32 px, batch 8, one epoch a stage) as --set pairs."""
    return [f"{k.replace('__', '.')}={v}" for k, v in fast_overrides(name).items()]


def _auto_recipe(pairs) -> tuple[str, Recipe]:
    """What `auto` resolves to on data/digits, as `finetune auto` and `search auto` resolve it."""
    found = suggest(DIGITS, **probe_choices(pairs))
    name, pairs = apply_suggestion(found, pairs)
    return found["recipe"], resolve_recipe(name, pairs)


def _sample(space: dict, rng: random.Random) -> dict:
    point = {}
    for key, s in space.items():
        if s["type"] == "categorical":
            point[key] = rng.choice(s["choices"])
        elif s["type"] == "int":
            point[key] = rng.randint(s["low"], s["high"])
        elif s["log"]:
            point[key] = s["low"] * (s["high"] / s["low"]) ** rng.random()
        else:
            point[key] = rng.uniform(s["low"], s["high"])
    return point


@pytest.mark.parametrize("name", NAMES)
def test_default_space_is_what_the_recipe_trains_and_every_point_builds(name):
    if name == "auto":
        name, recipe = _auto_recipe(["backbone=efficientnet_lite0", "input_size=32"])
        assert recipe.name == name and recipe.backbone == "efficientnet_lite0"
    else:
        recipe = registry.get(name)
    space = default_space(recipe)
    assert space and space == load_space("default", recipe)
    assert set(own_point(recipe, space)) == set(space)  # the defaults lie in it: a search's first trial
    # every recipe's head stage is an L-BFGS head at its defaults: searched by what changes its fit
    assert LBFGS_KEYS <= set(space) and "head.lr" not in space
    assert space["backbone"]["choices"][0] == recipe.backbone
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(space["backbone"]["choices"])
    assert "vgg16" not in space["backbone"]["choices"]  # its weights need a download
    for s in recipe.stages[1:]:  # fine-tuning stages: LR (log, around the recipe's), schedule, epochs, depth
        lr = space[f"{s.name}.lr"]
        assert lr["log"] and lr["low"] < s.lr < lr["high"]
        assert s.schedule in space[f"{s.name}.schedule"]["choices"] and s.train in space[f"{s.name}.train"]["choices"]
        assert space[f"{s.name}.epochs"]["low"] <= s.epochs <= space[f"{s.name}.epochs"]["high"]
    rng = random.Random(0)
    for _ in range(20):  # whole points, every key at once, through the recipe's own override
        point = _sample(space, rng)
        built = recipe.override(*[f"{k}={fmt(v)}" for k, v in point.items()])
        assert Recipe.from_json(built.to_json()) == built
        assert built.backbone == point["backbone"] and built.input_size == point["input_size"]


def test_sgd_heads_search_their_lr_schedule_and_epochs_and_set_keys_are_not_searched():
    sgd = registry.get("small_similar").override("head_solver=sgd")
    space = default_space(sgd)
    assert {"head.lr", "head.schedule", "head.epochs", "dropout", "l2", "batch_size"} <= set(space)
    assert not LBFGS_KEYS & set(space)  # an SGD head: its optimizer's fields, not the probe's
    assert space["head.epochs"] == {"type": "int", "low": 30, "high": 120, "log": False}
    assert own_point(sgd, space) == {"head.lr": 1e-3, "head.schedule": "one_cycle", "head.epochs": 60, "l2": 1e-4,
                                     "dropout": 0.2, "label_smoothing": 0.0, "batch_size": 32}
    # a value outside the space is not the first trial's: only the keys whose own value fits are given
    assert own_point(sgd, load_space({"head.lr": [0.01], "dropout": {"low": 0.0, "high": 0.5}}, sgd)) == {"dropout": 0.2}
    pinned = default_space(sgd, fixed=["head.epochs", "stages.0.lr", "batch_size"])
    assert set(space) - set(pinned) == {"head.epochs", "head.lr", "batch_size"}
    lbfgs = default_space(registry.get("large_similar"), fixed=["input_size", "backbone", "finetune__train"])
    assert not {"input_size", "backbone", "finetune.train"} & set(lbfgs) and "finetune.lr" in lbfgs


def test_an_empty_space_names_the_recipe_and_what_to_do():
    with pytest.raises(RecipeError, match=r"^Nothing to search in recipe small_similar with --space lr: its "
                                          r"head is fitted by L-BFGS \(head_solver=auto\).*--space default"):
        default_space(registry.get("small_similar"), "lr")
    everything = list(default_space(registry.get("small_different")))
    with pytest.raises(RecipeError, match=r"recipe small_different with --space default: --set fixes every key "
                                          r"it would search \(backbone, cache_views, head,"):
        default_space(registry.get("small_different"), fixed=everything)
    assert "finetune.lr" in default_space(registry.get("large_similar"), "lr")  # its fine-tuning stage


def test_auto_probes_what_set_pins_and_a_failed_probe_says_why(tmp_path):
    assert probe_choices(["head.lr=0.01"]) == {} and probe_choices({"input_size": 0}) == {}
    assert probe_choices(["backbone=efficientnet_lite1", "input_size=64"]) == {
        "backbone": "efficientnet_lite1", "input_size": 64}
    found = {"recipe": "large_similar", "backbone": "efficientnet_lite0"}
    assert apply_suggestion(found, ["backbone=efficientnet_lite2"]) == (  # the user's backbone comes last: it wins
        "large_similar", ["backbone=efficientnet_lite0", "backbone=efficientnet_lite2"])
    one = make_image_folder(tmp_path / "one", classes=("a",), per_class=4)
    with pytest.raises(RunError, match=r"^search auto: `tuneflow suggest .*one --json` failed \(exit 2\): .*single "
                                       r"class folder"):
        search("auto", one, 1, out=tmp_path / "s", verbose=False)
    assert not (tmp_path / "s").exists()


def test_head_c_range_sets_the_lbfgs_grid():
    assert grid_between(1e-3, 10.0) == DEFAULT_GRID
    assert grid_between(1e-4, 0.1) == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
    assert registry.get("small_similar").override("head_c_range=0.0001,0.1").head_c_range == (1e-4, 0.1)
    for bad in ("1,0.1", "0,1", "1,2,3"):
        with pytest.raises(RecipeError, match=rf"head_c_range=.*expected two numbers LOW,HIGH"):
            registry.get("small_similar").override(f"head_c_range={bad}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_search_runs_every_recipe_and_auto_at_its_defaults_on_digits(tmp_path, name):
    """`tuneflow search RECIPE --data data/digits --trials 2` as a user types it, with --set and
    --classes making each trial tiny: it runs, and the keys --set pins are not searched."""
    sets = _fast_sets("small_similar" if name == "auto" else name)
    out = tmp_path / "s"
    p = subprocess.run([sys.executable, "-m", "tuneflow", "search", name, "--data", str(DIGITS), "--trials", "2",
                        "--out", str(out), "--sampler", "random", "--classes", "0,1",
                        *[a for kv in sets for a in ("--set", kv)]],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], rows
    searched = set(rows[0]) - {"round", "number", "state", "val_accuracy", "val_loss", "epochs", "seconds", "run"}
    pinned = {kv.split("=")[0] for kv in sets}
    assert searched and not searched & pinned, (searched, pinned)
    assert "resize" in searched and "cache_views" in searched  # every recipe's head is L-BFGS at its defaults
    first = {k: rows[0][k] for k in ("resize", "cache_views", "head", "head_c_range")}
    assert first == {"resize": "crop", "cache_views": "1", "head": "linear", "head_c_range": "0.001,10.0"}  # defaults
    best = json.loads((out / "best_recipe.json").read_text())
    assert best["input_size"] == 32 and best["batch_size"] == 8  # --set kept
    if name == "auto":
        resolved = json.loads((out / "suggest.json").read_text())
        assert best["name"] == resolved["recipe"] and f"auto: {resolved['recipe']}" in p.stdout
        assert "auto: " + resolved["recipe"] in best["description"]
        assert f"auto: {resolved['recipe']} with backbone" in (out / "report.html").read_text()
    else:
        assert best["name"] == name
