"""tuneflow.suggest: the recipe from the data's size and similarity, the backbone from cheap probes."""
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import make_image_folder


@pytest.mark.slow
def test_suggest_reads_size_and_similarity(tmp_path, monkeypatch):
    from tuneflow import suggest as sg
    small = make_image_folder(tmp_path / "s", per_class=10, size=48)
    big = make_image_folder(tmp_path / "b", per_class=30, size=48, seed=3)
    monkeypatch.setattr(sg, "LARGE_PER_CLASS", 20)
    a = sg.suggest(small, input_size=64, candidates=("efficientnet_lite0",))
    b = sg.suggest(big, input_size=64, candidates=("efficientnet_lite0",))
    assert a["recipe"].startswith("small_") and b["recipe"].startswith("large_")
    for r in (a, b):
        final, early = r["probe_accuracy"][r["final_tap"]], max(
            v for k, v in r["probe_accuracy"].items() if k != r["final_tap"])
        assert r["similar"] == (final >= early - sg.MARGIN)
        assert r["recipe"].endswith("similar" if r["similar"] else "different")


def test_suggest_names_the_cheapest_backbone_within_the_margin(monkeypatch):
    from tuneflow import suggest as sg
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 12)
    x = rng.integers(0, 60, (24, 48, 48, 3)).astype(np.float32)
    x[y == 1, 12:36, 12:36] = 230
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 1.0)  # any accuracy ties: the cheapest must win
    c = sg.choose_backbone(x, y, ("efficientnet_lite0", "efficientnet_lite1"))
    assert c["backbone"] == "efficientnet_lite0" and set(c["probes"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    assert "cheapest" in c["reason"]
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 0.0)
    c = sg.choose_backbone(x, y, ("efficientnet_lite0", "efficientnet_lite1"), budget_seconds=0.0)
    assert list(c["probes"]) == ["efficientnet_lite0"] and "budget" in c["reason"]


def test_suggest_keeps_the_recipes_own_backbone_unless_another_probes_clearly_better():
    """`auto` must not swap a recipe's measured backbone (large_similar: Lite1 at 280 px) for one
    that merely ties on a small probe (one image's worth at this sample size counts as a tie), and
    must swap it for one clearly better, the cheapest such."""
    from tuneflow import suggest as sg
    assert registry.get("large_similar").backbone == "efficientnet_lite1"
    assert registry.get("small_similar").backbone == "auto"  # it would probe its candidates itself

    def choice(acc, chosen, images=1000):
        names = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        return {"backbone": chosen, "images": images, "reason": "r",
                "probes": {n: {"accuracy": a} for n, a in zip(names, acc)}}

    b, why = sg.prefer_recipe_backbone(choice((0.990, 0.992, 0.993), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite1" and "keeps it" in why and "0.992" in why  # own within the margin
    b, why = sg.prefer_recipe_backbone(choice((0.990, 0.992, 0.993), "efficientnet_lite0"), "small_similar")
    assert b == "efficientnet_lite0" and why == ""  # an auto recipe takes the probe's choice
    b, why = sg.prefer_recipe_backbone(choice((0.990, 0.992, 0.999), "efficientnet_lite2"), "small_similar")
    assert b == "efficientnet_lite2" and why == ""
    # The cheapest within the margin of the best (Lite0) is only 0.001 above own: not a reason to
    # leave it; Lite2, 0.0055 above own, is, and it replaces it.
    b, why = sg.prefer_recipe_backbone(choice((0.9945, 0.9935, 0.999), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite2" and "replaces it" in why and "0.999 vs 0.994" in why
    # Two of them clearly above own: the cheaper wins.
    b, _ = sg.prefer_recipe_backbone(choice((0.990, 0.970, 0.992), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite0"
    # On 120 probed images one image is 0.0083: a 0.008 lead is a tie, a 0.017 lead is not.
    b, why = sg.prefer_recipe_backbone(choice((0.975, 0.967, 0.975), "efficientnet_lite0", 120), "large_similar")
    assert b == "efficientnet_lite1" and "0.008" in why
    b, _ = sg.prefer_recipe_backbone(choice((0.983, 0.967, 0.983), "efficientnet_lite0", 120), "large_similar")
    assert b == "efficientnet_lite0"
    # The budget stopped the probe before the recipe's own backbone: it stays, and the reason says so.
    b, why = sg.prefer_recipe_backbone({"backbone": "efficientnet_lite0", "reason": "r", "images": 120,
                                        "probes": {"efficientnet_lite0": {"accuracy": 0.9}}}, "large_similar")
    assert b == "efficientnet_lite1" and "not probed within the time budget" in why


def test_suggest_names_the_recipes_backbone_on_a_tie(tmp_path, monkeypatch):
    from tuneflow import suggest as sg
    big = make_image_folder(tmp_path / "b", per_class=30, size=48, seed=3)
    monkeypatch.setattr(sg, "LARGE_PER_CLASS", 20)
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 1.0)  # every probe ties: the cheapest, Lite0, is chosen
    monkeypatch.setattr(sg, "MARGIN", 1.0)  # the final layer always "wins": large_similar (Lite1)
    r = sg.suggest(big, input_size=64, candidates=("efficientnet_lite0", "efficientnet_lite1"))
    assert r["recipe"] == "large_similar"
    assert r["backbone"] == "efficientnet_lite1" and "keeps it" in r["backbone_reason"], r["backbone_reason"]
    assert r["probe_backbone"] == "efficientnet_lite0" and r["probe_size"] == 64  # what the taps' evidence came from
