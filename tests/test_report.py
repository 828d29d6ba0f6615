"""The report (tuneflow.runs.report): the majority-class baseline and its verdict, and confusion
output that stays bounded for many classes."""
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from tuneflow.runs import report as rep

YN = ["no", "yes"]


def brain_like(correct: int):
    """49 validation labels, 32 "yes" (brain_mri_yn's split), and predictions with ``correct`` right."""
    y = np.array([0] * 17 + [1] * 32)
    pred = y.copy()
    wrong = 49 - correct
    pred[:wrong] = 1 - pred[:wrong]
    return y, pred


def curve_rows(train_acc, val_acc, n=5):
    return [{"stage": 0, "epoch": i, "loss": 0.5, "accuracy": train_acc, "val_loss": 0.5,
             "val_accuracy": val_acc} for i in range(n)]


def test_majority_rate():
    assert rep.majority_rate([1, 1, 0, 2]) == 0.5
    assert rep.majority_rate(np.array([0] * 17 + [1] * 32), 2) == pytest.approx(32 / 49)


def test_baseline_needs_significance_not_one_lucky_image():
    from scipy.stats import binomtest
    for correct, beats in ((32, False), (33, False), (37, False), (38, True), (45, True)):
        y, pred = brain_like(correct)
        b = rep.majority_baseline(y, pred, YN)
        assert b["val_correct"] == correct and b["num_val"] == 49
        assert b["majority_class"] == "yes" and b["majority_rate"] == pytest.approx(32 / 49)
        assert b["needed_correct"] == 38
        assert b["beats_majority"] is beats, (correct, b["p_value"])
        assert b["p_value"] == pytest.approx(binomtest(correct, 49, 32 / 49, alternative="greater").pvalue)


def test_verdict_no_better_than_chance_with_advice():
    y = np.array([0] * 17 + [1] * 32)
    b = rep.majority_baseline(y, np.ones(49, int), YN)  # the landed small_different on brain_mri_yn
    v, advice = rep.verdict(curve_rows(0.70, 0.6531), b)
    assert v == "no better than chance"
    assert "'yes'" in advice and "38/49" in advice and "p = 0.57" in advice
    assert "answers 'yes' for every image" in advice
    assert "class_weight=balanced" in advice and "taps" in advice


def test_verdict_tiny_validation_cannot_beat_chance():
    b = rep.majority_baseline([0, 0, 0, 1, 1], [0, 0, 0, 1, 1], ["a", "b"])  # 5/5 right
    assert b["needed_correct"] is None and not b["beats_majority"]
    v, advice = rep.verdict(curve_rows(1.0, 1.0), b)
    assert v == "no better than chance"
    assert "folds=5" in advice and "5 validation images" in advice


def test_verdict_falls_back_to_the_curves_when_chance_is_beaten():
    y, pred = brain_like(45)
    b = rep.majority_baseline(y, pred, YN)
    assert rep.verdict(curve_rows(1.0, 45 / 49), b)[0] == "good fit"
    assert rep.verdict(curve_rows(1.0, 0.8), b)[0] == "over-fitting"
    assert rep.verdict(curve_rows(0.9, 0.9))[0] == "good fit"  # old call, no baseline
    assert rep.verdict([])[0] == "unknown"


def minimal_report(**extra):
    r = {"recipe": "small_similar", "backbone": "efficientnet_lite0", "weights": "imagenet",
         "input_size": 224, "data": "d", "num_train": 10, "num_val": 49, "classes": YN,
         "val_accuracy": 0.6531, "val_loss": 0.7, "images_per_second": 0.0, "wall_seconds": 1.0,
         "strategy": "Default", "replicas": 1, "global_batch": 32, "precision": "float32",
         "norm": "batch", "verdict": "good fit", "advice": "-", "stages": [], "per_class": {}}
    r.update(extra)
    return r


def test_markdown_shows_the_majority_rate_next_to_val_accuracy():
    y = np.array([0] * 17 + [1] * 32)
    b = rep.majority_baseline(y, np.ones(49, int), YN)
    md = rep.markdown(minimal_report(majority_rate=b["majority_rate"], baseline=b))
    line = next(s for s in md.splitlines() if "val accuracy" in s)
    assert "majority-class rate 0.6531 ('yes', 32/49)" in line and "**not beaten**" in line
    y, pred = brain_like(45)
    b = rep.majority_baseline(y, pred, YN)
    md = rep.markdown(minimal_report(val_accuracy=45 / 49, majority_rate=b["majority_rate"], baseline=b))
    assert "beaten (binomial p =" in md and "not beaten" not in md
    assert "majority" not in rep.markdown(minimal_report())  # a report from before keeps working


def test_most_confused_picks_the_confused_classes():
    cm = np.diag(np.full(50, 10))
    cm[7, 42] = cm[42, 7] = 5
    cm[3, 9] = 4
    cm[30, 31] = 1
    top = rep.most_confused(cm, top=4)
    assert list(top) == [3, 7, 9, 42]
    assert list(rep.most_confused(cm[:4, :4], top=20)) == [0, 1, 2, 3]


def test_write_confusion_small(tmp_path):
    classes = ["ant", "bee, honey", "wasp"]  # a comma in a name: the CSV must quote it
    cm = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 3]])
    png, path = rep.write_confusion(cm, classes, tmp_path)
    assert png == tmp_path / "confusion.png" and path == tmp_path / "confusion.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == classes and [r[0] for r in rows[1:]] == classes
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], int), cm)
    assert Image.open(png).format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.csv", "confusion.png"]


def test_write_confusion_failure_leaves_no_temp_file(tmp_path):
    (tmp_path / "confusion.csv").mkdir()  # something in the way: os.replace cannot overwrite it
    with pytest.raises(OSError):
        rep.write_confusion(np.eye(2, dtype=int), YN, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.csv"]
    with pytest.raises(ValueError, match="3 classes"):
        rep.write_confusion(np.eye(2, dtype=int), ["a", "b", "c"], tmp_path)


@pytest.mark.slow
def test_write_confusion_1000_classes_is_bounded(tmp_path):
    """1000 classes: before, plot_confusion ran out of memory (200 classes took 3.5 GB)."""
    # A fresh process that loads report.py alone (no TensorFlow), so its peak RSS is the plot's.
    script = textwrap.dedent(f"""
        import importlib.util, json, time
        import numpy as np
        spec = importlib.util.spec_from_file_location("report", {str(REPO / "tuneflow/runs/report.py")!r})
        rep = importlib.util.module_from_spec(spec); spec.loader.exec_module(rep)
        from pathlib import Path
        out = Path({str(tmp_path)!r})
        (out / "warm").mkdir()
        rep.write_confusion(np.eye(3, dtype=int), ["a", "b", "c"], out / "warm")  # matplotlib loaded
        rng = np.random.default_rng(0)
        n = 1000
        cm = rng.poisson(0.05, (n, n)) + np.diag(rng.integers(20, 60, n))
        classes = [f"class_{{i:04d}}_with_a_long_name" for i in range(n)]
        def status(key):  # MB; VmHWM is this address space's peak (ru_maxrss would include the
            # parent's: Linux keeps it across fork + exec)
            line = next(s for s in open("/proc/self/status") if s.startswith(key + ":"))
            return int(line.split()[1]) / 1024
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass  # VmHWM keeps the import peaks: the growth below is then an overestimate
        rss = status("VmRSS")
        t = time.time()
        rep.write_confusion(cm, classes, out)
        peak = status("VmHWM")
        print(json.dumps({{"seconds": time.time() - t, "growth_mb": peak - rss, "total": int(cm.sum()),
                          "top": rep.most_confused(cm).tolist()}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"1000 classes: write_confusion {m['seconds']:.1f} s, peak RSS growth {m['growth_mb']:.0f} MB")
    assert m["growth_mb"] < 300 and m["seconds"] < 60
    img = Image.open(tmp_path / "confusion.png")
    assert img.format == "PNG" and max(img.size) < 2000  # 20 classes + "(other)", not 1000
    with open(tmp_path / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1001 and all(len(r) == 1001 for r in rows)
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == m["total"]
    assert len(m["top"]) == rep.TOP_CONFUSED


def _rows(stage, losses, accs):
    return [{"stage": str(stage), "epoch": str(i + 1), "loss": str(l), "accuracy": "0.5", "val_loss": "0.6",
             "val_accuracy": str(a)} for i, (l, a) in enumerate(zip(losses, accs))]


STAGES = [{"name": "head", "train": "frozen", "epochs_run": 1, "optimizer": "lbfgs", "lr": 0.0,
           "schedule": "converged", "cache": True},
          {"name": "finetune", "train": "top:6", "epochs_run": 7, "optimizer": "momentum", "lr": 1e-3,
           "schedule": "warmup_cosine", "cache": False}]


def test_stage_health_flags_a_stage_whose_training_loss_blew_up():
    # large_different fine-tuning 203 brain MRIs at lr 1e-3 (metrics.csv of a real run, rounded)
    rows = _rows(0, [0.22], [0.694]) + _rows(1, [1.05, 148.7, 4.24, 0.69, 0.67, 0.68, 0.70],
                                            [0.347, 0.347, 0.653, 0.653, 0.653, 0.653, 0.347])
    head, ft = rep.stage_health(rows, STAGES)
    assert not head["diverged"] and head["best_val_accuracy"] == pytest.approx(0.694)
    assert ft["diverged"] and ft["first_loss"] == 1.05 and ft["max_loss"] == 148.7 and ft["epochs"] == 7
    advice = rep.divergence_advice([head, ft], {"stage": "head", "index": 0, "epoch": "end"}, "large_different",
                                   "../shared/datasets/brain_mri_yn")
    assert "Stage 'finetune' diverged (training loss 1.05, then 149 by epoch 2)" in advice
    assert "not kept (the model is from stage 'head')" in advice
    assert "--set finetune.lr=" in advice
    assert "tuneflow lr-find large_different --data ../shared/datasets/brain_mri_yn --stage 1" in advice
    # The report says where the model's weights come from, and shows each stage's health.
    md = rep.markdown(minimal_report(stages=STAGES, stage_health=[head, ft],
                                     model_from={"stage": "head", "index": 0, "epoch": "end"}))
    assert "- model: the best validated weights, from stage 'head' (its end)" in md
    row = next(s for s in md.splitlines() if s.startswith("| finetune |"))
    assert "| 0.6530 |" in row and "1.05 -> 0.7, max 149 **diverged**" in row


def test_stage_health_catches_a_blow_up_after_a_fall():
    # From an untrained head: the loss falls, then blows up to 15x its low but below 3x its start.
    (h,) = rep.stage_health(_rows(0, [2.3, 0.2, 3.0, 2.5], [0.5, 0.9, 0.5, 0.5]), STAGES[:1])
    assert h["diverged"] and h["diverged_at_epoch"] == 3 and h["lowest_before"] == 0.2
    assert "training loss 0.2, then 3 by epoch 3" in rep.divergence_advice([h], None, "r", "my data")
    assert "--data 'my data'" in rep.divergence_advice([h], None, "r", "my data")  # quoted for a shell


@pytest.mark.parametrize("losses", [
    [0.9, 0.7, 0.5, 0.45],  # falling: healthy
    [0.3, 0.5, 0.8, 1.1],  # rising 3.7x but by less than a nat: over-fitting's drift, not divergence
    [2.0, 2.6, 2.2],  # a wobble of tens of percent at a high loss
    [0.5],  # one epoch: nothing to compare
])
def test_stage_health_leaves_ordinary_curves_alone(losses):
    (h,) = rep.stage_health(_rows(0, losses, [0.8] * len(losses)), STAGES[:1])
    assert not h["diverged"]
    assert rep.divergence_advice([h], None, "small_similar") == ""


def test_stage_health_skips_stages_that_did_not_run():
    assert [h["stage"] for h in rep.stage_health(_rows(0, [0.5, 0.4], [0.8, 0.8]), STAGES)] == ["head"]
