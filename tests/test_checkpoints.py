"""Checkpoints for real: corruption, mismatches, strategies and a SIGKILL in the middle of an epoch."""
import csv
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import REPO, make_image_folder, random_lite0_weights
from tuneflow import finetune
from tuneflow.runs.checkpoints import CheckpointMismatchError, Checkpoints, restore_model

FT = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 4, "precision": "float32",
      "head__epochs": 1, "finetune__epochs": 3, "head__patience": 0, "finetune__patience": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    data = make_image_folder(root / "d", per_class=8)
    res = finetune("large_similar", data, root / "run", overrides=FT, verbose=0)
    return res, data


@pytest.mark.slow
def test_last_and_best_checkpoints_exist_and_best_is_never_worse(trained):
    res, _ = trained
    ck = res.run_dir / "checkpoints"
    c = Checkpoints(ck, res.model)
    manifests = {Path(p).name: Checkpoints.manifest(p) for p in c.checkpoints()}
    numbers = sorted(manifests)
    # the newest 2 (max_to_keep), each stage's best and the best: nothing else
    best = json.loads((ck / "best.json").read_text())
    keep = set(numbers[-2:]) | {best["checkpoint"]} | {s["checkpoint"] for s in best["stages"].values()}
    assert set(numbers) == keep
    assert (manifests[numbers[-1]]["stage"], manifests[numbers[-1]]["epoch"]) == (2, 0)  # the run's end
    rows = list(csv.DictReader(open(res.run_dir / "metrics.csv")))
    assert best["val_accuracy"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows), abs=1e-6)
    # a worse epoch saved later (into a copy of the run) never becomes the best
    import shutil
    shutil.copytree(ck, res.run_dir.parent / "ck-copy")
    c = Checkpoints(res.run_dir.parent / "ck-copy", res.model)
    c.save(9, 9, {"val_accuracy": best["val_accuracy"] - 0.1, "val_loss": 0.0})
    after = json.loads((res.run_dir.parent / "ck-copy" / "best.json").read_text())
    assert (after["checkpoint"], after["val_accuracy"]) == (best["checkpoint"], best["val_accuracy"])


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(trained, caplog):
    res, _ = trained
    import shutil
    run = res.run_dir.parent / "copy"
    shutil.copytree(res.run_dir, run)
    c = Checkpoints(run / "checkpoints", res.model)
    newest, older = c.checkpoints()[-1], c.checkpoints()[-2]
    data = next(Path(newest).glob("ckpt.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert c.latest_good() == older
    assert str(data) in caplog.text and "truncated or corrupted" in caplog.text


def test_restoring_into_another_backbone_names_the_variables(trained):
    res, _ = trained
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(3, 3, name="stem_conv"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, name="head_classifier")])
    with pytest.raises(CheckpointMismatchError) as err:
        restore_model(other, res.run_dir)
    msg = str(err.value)
    assert "stem_conv/kernel: checkpoint [3, 3, 3, 32] vs model [3, 3, 3, 3]" in msg
    assert "not in this model" in msg and "recipe.json" in msg


def test_restore_model_round_trips_predictions(trained):
    res, _ = trained
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.float32)
    fresh = keras.models.clone_model(res.model)  # built as training built it
    for w in fresh.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    restore_model(fresh, res.run_dir)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), res.model.predict(x, verbose=0), atol=1e-6)


def test_restoring_into_a_differently_nested_compiled_model_works_by_name(trained):
    """Checkpoints hold the weights by layer/variable name: a model nested otherwise (TensorFlow's
    object graph differs) and compiled with another optimizer still gets every weight."""
    res, _ = trained
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.float32)
    wrapped = keras.Sequential([keras.Input(res.model.input_shape[1:]), keras.models.clone_model(res.model)])
    wrapped.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    for w in wrapped.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    restore_model(wrapped, res.run_dir)
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), res.model.predict(x, verbose=0), atol=1e-6)


STRATEGY_SCRIPT = textwrap.dedent("""
    import sys, json, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tuneflow import finetune
    from tuneflow.runs.checkpoints import restore_model
    data, out, train_strategy, restore_strategy, weights = sys.argv[1:6]
    ov = dict(input_size=32, backbone="efficientnet_lite0", weights=weights, batch_size=4, precision="float32", strategy=train_strategy,
              head__epochs=1, finetune__epochs=1, scale_lr=True, head__schedule="constant", head_solver="sgd")
    res = finetune("large_similar", data, out, overrides=ov, verbose=0)
    x = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3)).astype(np.float32)
    from tuneflow.training.distribute import make_strategy
    strategy = make_strategy(restore_strategy)
    with strategy.scope():
        model = keras.models.clone_model(res.model)  # the training graph, built under the other strategy
        for w in model.weights:
            w.assign(tf.zeros(w.shape, w.dtype))
        restore_model(model, out)
    a, b = res.model.predict(x, verbose=0), model.predict(x, verbose=0)
    import csv
    first_lr = float(next(csv.DictReader(open(f"{out}/metrics.csv")))["lr"])
    auto = make_strategy("auto")  # no GPUs: the default strategy, even with two logical CPUs
    print(json.dumps({"replicas": res.report["replicas"], "global_batch": res.report["global_batch"],
                      "lr_scale": res.report["lr_scale"], "first_lr": first_lr,
                      "auto": type(auto).__name__, "auto_replicas": auto.num_replicas_in_sync,
                      "restored_replicas": strategy.num_replicas_in_sync,
                      "maxdiff": float(np.abs(a - b).max())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("train_s, restore_s", [("mirrored", "default"), ("default", "mirrored")])
def test_checkpoints_restore_across_strategies(tmp_path, train_s, restore_s):
    data = make_image_folder(tmp_path / "d", per_class=6)
    script = tmp_path / "s.py"
    script.write_text(STRATEGY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "run"), train_s, restore_s,
                          random_lite0_weights()],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == (2 if train_s == "mirrored" else 1)
    assert result["global_batch"] == 4 * result["replicas"]
    # linear LR scaling with the global batch: head lr 1e-3 x replicas, in the report and in use
    assert result["lr_scale"] == result["replicas"]
    assert result["first_lr"] == pytest.approx(1e-3 * result["replicas"])
    assert result["auto_replicas"] == 1
    assert result["restored_replicas"] == (2 if restore_s == "mirrored" else 1)
    assert result["maxdiff"] < 1e-5


# `tuneflow finetune` with a batch-level marker: each training batch's (stage, epoch, batch) is
# appended to MARKER as it ends, and the process SIGKILLs itself at the batch KILL_AT names. The
# marker is what proves where the kill landed, and where a resumed run starts again.
MARKER_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import tuneflow.training.stages as stages
    from tuneflow.cli import main

    marker, kill_at = open(sys.argv[1], "a", buffering=1), sys.argv[2]
    begin = stages.EpochHook.on_epoch_begin

    def on_epoch_begin(self, epoch, logs=None):
        self.marker_epoch = epoch
        begin(self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        at = f"{self.stage_index} {self.marker_epoch} {batch}"
        marker.write(at + "\\n")
        if at == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    stages.EpochHook.on_epoch_begin = on_epoch_begin
    stages.EpochHook.on_train_batch_end = on_train_batch_end
    sys.exit(main(sys.argv[3:]))
""")


def _marks(path):
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    # A frozen (random) Lite0 with its top blocks trained through the images (prefix_cache=off: the
    # cached-prefix path trains on activations, not through the images), 3 fine-tuning epochs.
    data = make_image_folder(tmp_path / "d", per_class=12, size=32)
    run = tmp_path / "run"
    script = tmp_path / "marked.py"
    script.write_text(MARKER_SCRIPT)
    sets = ["input_size=32", "backbone=efficientnet_lite0", f"weights={random_lite0_weights()}", "batch_size=2", "precision=float32",
            "head.epochs=1", "finetune.epochs=3", "head.patience=0", "finetune.patience=0", "prefix_cache=off"]
    args = ["finetune", "large_similar", "--data", str(data), "--out", str(run)] + [a for s in sets for a in ("--set", s)]
    # Killed at the end of the 4th batch of the fine-tuning stage's 2nd epoch (0-based: stage 1, epoch 1, batch 3).
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "m1"), "1 1 3", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    marks = _marks(tmp_path / "m1")
    steps = 1 + max(b for s, e, b in marks if (s, e) == (1, 0))  # batches in an epoch
    assert steps > 4 and marks[-1] == (1, 1, 3)  # killed mid-epoch: batch 4 of `steps`, not at its end
    assert [(r["stage"], r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv"))] == [("0", "1"), ("1", "1")]
    refused = subprocess.run([sys.executable, "-m", "tuneflow", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "m2"), "none", *args, "--resume"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    # The resumed run trains from the start of the interrupted epoch: no head stage, no epoch 1 again,
    # the interrupted epoch whole, then the last one.
    again = _marks(tmp_path / "m2")
    assert again == [(1, e, b) for e in (1, 2) for b in range(steps)], again[:5]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("0", "1"), ("1", "1"), ("1", "2"), ("1", "3")]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_early_stopping_state_survives_a_crash_and_resume(tmp_path, monkeypatch):
    """lr ~ 0 keeps val accuracy constant: epoch 1 is the best, patience 2 stops after epoch 3.
    Crash after epoch 2 (wait = 1): the resumed stage must stop at epoch 3 too, not restart its count."""
    import tuneflow.training.stages as train
    data = make_image_folder(tmp_path / "d", per_class=8)
    ov = {"input_size": 32, "backbone": "efficientnet_lite0", "batch_size": 4, "precision": "float32",
          "head__epochs": 1, "head__patience": 0, "finetune__epochs": 8, "finetune__patience": 2, "finetune__lr": 1e-12,
          "finetune__schedule": "constant"}
    original = train.EpochHook.on_epoch_end

    def crash_after_epoch_2(self, epoch, logs=None):
        original(self, epoch, logs)
        if self.stage_index == 1 and epoch + 1 == 2:
            raise _Crash("simulated crash")

    monkeypatch.setattr(train.EpochHook, "on_epoch_end", crash_after_epoch_2)
    with pytest.raises(_Crash):
        finetune("large_similar", data, tmp_path / "run", overrides=ov, verbose=0)
    monkeypatch.setattr(train.EpochHook, "on_epoch_end", original)
    state = Checkpoints.manifest(Checkpoints(tmp_path / "run" / "checkpoints", keras.Sequential())
                                 .checkpoints()[-1])["early_stopping"]
    assert state["wait"] == 1 and state["best_epoch"] == 1
    res = finetune("large_similar", data, tmp_path / "run", overrides=ov, verbose=0, resume=True)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("0", "1"), ("1", "1"), ("1", "2"), ("1", "3")]
    assert res.report["stages"][1]["epochs_run"] == 3
