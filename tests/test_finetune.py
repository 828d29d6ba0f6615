"""tuneflow.finetune end to end: every recipe's stages, the run folder it writes, refusals and
failures that leave a resumable or no run, NaN and divergence diagnosed in the report."""
import json

import keras
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import fast_overrides as _fast, make_image_folder
from tuneflow import finetune
from tuneflow.runs.folder import RunExistsError


# small_similar (the default) in the quick suite; the other three recipes, which train the backbone
# (tens of seconds each), in the slow tier
@pytest.mark.parametrize("name", [n if n == "small_similar" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in registry.NAMES])
def test_every_recipe_runs_each_stage_and_writes_a_readable_run(tmp_path, tiny_folder, name):
    res = finetune(name, tiny_folder, tmp_path / "run", overrides=_fast(name), verbose=0)
    run = res.run_dir
    for f in ("recipe.json", "metrics.csv", "curves.png", "confusion.png", "report.json",
              "report.md", "model.keras", "backbone.weights.h5", "run.json"):
        assert (run / f).exists(), f
    rep = json.loads((run / "report.json").read_text())
    for k in ("val_accuracy", "val_loss", "wall_seconds", "recipe", "backbone", "num_train",
              "num_val", "classes", "per_class", "verdict", "global_batch"):
        assert k in rep
    assert [s["name"] for s in rep["stages"]] == [s.name for s in registry.get(name).stages]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,epoch,loss,accuracy,val_loss,val_accuracy,lr")
    assert len(rows) - 1 == len(registry.get(name).stages)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # the saved model takes raw pixels and reproduces the reported accuracy's predictions
    model = keras.saving.load_model(run / "model.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), np.uint8), verbose=0).shape == (1, 2)


def test_imbalanced_run_reports_per_class_metrics(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"a": 24, "b": 6})
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, export=False,
                   overrides={**_fast("small_similar"), "class_weight": "balanced"})
    assert set(res.report["per_class"]) == {"a", "b"}
    assert res.report["train_counts"]["a"] > res.report["train_counts"]["b"]


def test_existing_run_is_refused_unless_overwrite(tmp_path, tiny_folder):
    ov = _fast("small_similar")
    finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0, export=False)
    with pytest.raises(RunExistsError, match="--resume .*--overwrite"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0, export=False)
    finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0, overwrite=True, export=False)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RunExistsError, match="not a tuneflow run"):
        finetune("small_similar", tiny_folder, other, overrides=ov, verbose=0, overwrite=True)
    assert (other / "thesis.tex").exists()


def test_failed_fresh_run_leaves_nothing_behind(tmp_path, tiny_folder, monkeypatch):
    from tuneflow.training import stages
    boom = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # noqa: E731
    monkeypatch.setattr(stages, "cached_features", boom)
    with pytest.raises(RuntimeError, match="boom"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    assert not (tmp_path / "r").exists()


def test_failure_after_a_checkpoint_keeps_the_run_for_resume(tmp_path, tiny_folder, monkeypatch):
    from tuneflow.fit import one_run as train
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    status = json.loads((tmp_path / "r" / "run.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"]


def test_bad_data_fails_before_a_run_folder_exists(tmp_path):
    from tuneflow.data import DataError
    with pytest.raises(DataError, match="does not exist"):
        finetune("small_similar", tmp_path / "nope", tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_nan_loss_stops_training_with_a_diagnosis(tmp_path, tiny_folder, seed):
    # Divergence by construction, whatever the seed: plain SGD at lr=10 with an L2 penalty of 1e6
    # multiplies the head's kernel by about -2e7 every step, so it overflows within ~6 steps
    # (the head stage runs ~30).
    ov = {**_fast("large_different"), "seed": seed, "clipnorm": 0.0, "l2": 1e6, "head__epochs": 10,
          "head_solver": "sgd",
          "head__lr": 10.0, "head__optimizer": "sgd", "head__schedule": "constant", "head__patience": 0}
    res = finetune("large_different", tiny_folder, tmp_path / "r", overrides=ov, verbose=0, export=False)
    note = res.report["nan"]
    assert note is not None, "training did not diverge: the NaN path was not exercised"
    assert "'head' produced a NaN/inf loss" in note
    assert "learning rate 10 is high" in note and "clipnorm" in note and "L1/L2 penalty (1e+06)" in note
    assert res.report["stages"][0]["epochs_run"] < 10  # stopped, not run to the end
    assert len(res.report["stages"]) == 1  # and the later stage was not started
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_diverging_stage_is_named_in_the_report_and_not_kept(tmp_path, tiny_folder):
    """A real divergence (plain SGD at lr 1 on the top blocks: the training loss climbs from ~0.002
    to thousands): the model keeps the head's weights, and the report names the stage, its losses
    and what to do, beside which weights the model holds."""
    # Real ImageNet weights (offline Lite0): the head fits at once and the fine-tuning's first epoch
    # is still near it; random weights blow up within the first epoch, where no curve shows it.
    ov = {**_fast("large_similar"), "weights": "imagenet", "finetune__epochs": 4, "finetune__lr": 1.0,
          "finetune__patience": 0,
          "finetune__optimizer": "sgd", "finetune__schedule": "constant", "clipnorm": 0.0}
    res = finetune("large_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0)
    rep = res.report
    assert rep["nan"] is None  # finite: not the NaN path
    head, ft = rep["stage_health"]
    assert ft["diverged"] and not head["diverged"], [(h["first_loss"], h["max_loss"]) for h in rep["stage_health"]]
    assert ft["max_loss"] > 3 * ft["first_loss"] and ft["epochs"] == 4
    assert rep["model_from"]["stage"] == "head" and rep["model_from"]["epoch"] == "end"
    assert "Stage 'finetune' diverged" in rep["advice"] and "not kept (the model is from stage 'head')" in rep["advice"]
    assert f"tuneflow lr-find large_similar --data {tiny_folder} --stage 1" in rep["advice"]
    md = (res.run_dir / "report.md").read_text()
    assert "**diverged**" in md and "- model: the best validated weights, from stage 'head' (its end)" in md


def test_numpy_arrays_in_a_notebook(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8)
    y = np.arange(40) % 2
    x[y == 1, 8:24, 8:24] = 255
    res = finetune(registry.get("small_similar"), (x, y), tmp_path / "r", overrides=_fast("small_similar"), verbose=0,
                   export=False)
    assert res.report["data"] == "arrays"


