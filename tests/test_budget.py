"""tuneflow.training.budget: --budget and --quality. A duration is parsed or refused by name, a
budget too small for any plan or for this data is refused before a run folder exists, and a budget
that runs out mid-stage ends a complete, loadable run that says what was cut."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image_folder, random_lite0_weights
from tuneflow.errors import RecipeError
from tuneflow.recipes import large_similar, small_similar
from tuneflow.training import budget as bd


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                           ("2.5m", 150), (" 45 s ", 45), (120, 120)])
def test_durations_parse(text, seconds):
    assert bd.parse_budget(text) == seconds


@pytest.mark.parametrize("text, said", [
    ("soon", "--budget 'soon' is not a duration; write seconds or a number with a unit: 90s, 10m, 2h, 1h30m."),
    ("10x", "is not a duration"),
    ("", "is not a duration"),
    ("1h30", "is not a duration"),  # a bare number after a unit is ambiguous
    ("0s", "must be a positive duration"),
    ("5s", "(5 s) is too small for any plan"),
    (3, "give at least 15s"),
])
def test_bad_durations_are_refused_by_name(text, said):
    with pytest.raises(RecipeError) as e:
        bd.parse_budget(text)
    assert said in str(e.value)


def test_quality_presets_are_overrides_the_user_can_still_change():
    assert bd.quality_overrides(small_similar, "balanced") == {} == bd.quality_overrides(small_similar, None)
    assert bd.quality_overrides(small_similar, "fast") == {"backbone": "efficientnet_lite0", "input_size": 0}
    assert bd.quality_overrides(large_similar, "fast") == {"input_size": 0}  # its backbone is named
    best = bd.quality_overrides(small_similar, "best")
    assert best["backbone_probe_seconds"] == 3 * small_similar.backbone_probe_seconds
    small_similar.override(**bd.quality_overrides(small_similar, "fast"))  # valid overrides
    small_similar.override(**best)
    with pytest.raises(RecipeError, match="--quality 'max' is not valid; choose one of fast, balanced, best"):
        bd.quality_overrides(small_similar, "max")


def test_a_plan_that_cannot_fit_says_what_it_needs():
    d = bd.Deadline(30.0)
    plan = d.check_feasible(100, 50.0, 40)  # 2 s of features, 20 + 0.8 s kept: fits
    assert plan["feature_pass_estimate"] == 2.0 and plan["measured"]
    with pytest.raises(RecipeError) as e:
        bd.Deadline(30.0).check_feasible(3000, 50.0, 500)  # 60 s of features alone
    msg = str(e.value)
    assert "--budget 30s is too small for this data on this machine" in msg
    assert "the feature pass over 3000 images needs about 60 s at the 50 images/s just measured" in msg
    assert "Give --budget" in msg and "--quality fast" in msg
    bd.Deadline(30.0).check_feasible(3000, None, 500)  # no measured speed: nothing refused on a guess


@pytest.mark.slow
def test_a_budget_too_small_for_the_data_is_refused_before_any_run_folder(tmp_path):
    """The backbone probe measures this machine's speed; a folder whose feature pass cannot fit
    in what is left is refused through the CLI in one line, and no run folder is made."""
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=300, size=40)
    exe = str(Path(sys.executable).parent / "tuneflow")
    out = tmp_path / "run"
    r = subprocess.run([exe, "finetune", "small_similar", "--data", str(data), "--out", str(out), "--budget", "16s",
                        "--set", "input_size=224", "--set", "backbone_candidates=efficientnet_lite0,efficientnet_lite1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert any("--budget 16s is too small for this data on this machine" in line for line in err), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_budget_hit_mid_stage_leaves_a_complete_loadable_run(tmp_path):
    """A fine-tuning stage of many epochs under a budget that cannot hold them: the stage stops at
    the budget, the run is exported and evaluated, the report says what was cut, and it loads."""
    import tuneflow
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=12, size=48)
    out = tmp_path / "run"
    ov = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 4,
          "precision": "float32", "head__epochs": 1, "finetune__epochs": 100000, "finetune__patience": 0,
          "finetune__schedule": "constant", "prefix_cache": "off", "tensorboard_histograms": 0}
    res = tuneflow.finetune("large_similar", data, out, overrides=ov, verbose=0, budget="40s")
    b = res.report["budget"]
    assert b["seconds"] == 40 and any("stage 'finetune' stopped by the budget" in c for c in b["cut"]), b
    ft = next(s for s in res.report["stages"] if s["name"] == "finetune")
    assert 1 <= ft["epochs_run"] < 100000
    assert set(b["parts"]) >= {"data_and_backbone", "stage head", "stage finetune"}
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["cut"] == b["cut"]
    model = tuneflow.load(out)  # the exported artifact, measured by the report
    assert model.classes == ["a", "b"]
    assert len(model.predict([str(next((data / "a").iterdir()))])) == 1
