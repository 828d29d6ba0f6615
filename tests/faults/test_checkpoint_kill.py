"""kill -9 at every step of a checkpoint save, for real, then reopen: nothing lost, best never worse."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fault_driver import fill, tag, tiny_model
from tuneflow.runs.checkpoints import Checkpoints, verify
from tuneflow.runs.folder import TMP_TAG

DRIVER = Path(__file__).with_name("fault_driver.py")
POINTS = ["before_data", "after_data_before_rename", "after_rename_before_manifest", "mid_manifest",
          "after_manifest_before_best", "mid_best_json", "after_best_before_prune", "mid_prune"]
WRITTEN = POINTS.index("after_manifest_before_best")  # from here on the new checkpoint exists
# Saves #1..#5 before the killed one. Stage 0's epoch 2 (0.8) is the best and, at the kill, no longer
# among the newest two: only the best-keeping rule holds it. #4 marks stage 0's end (stage 1, epoch 0).
HISTORY = [[0, 1, 0.5], [0, 2, 0.8], [0, 3, 0.6], [1, 0, 0.6], [1, 1, 0.7]]


SCENARIOS = {**{("best", pt): HISTORY + [[1, 2, 0.9]] for pt in POINTS},
             **{("worse", pt): HISTORY + [[1, 2, 0.65]] for pt in
                ("after_rename_before_manifest", "after_manifest_before_best", "mid_prune")},
             **{("stage", pt): [[0, 1, 0.5], [0, 2, 0.6], [1, 0, 0.6]] for pt in
                ("after_data_before_rename", "after_manifest_before_best")}}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every scenario in its own process, killed by SIGKILL at its point during its last save. The
    processes run four at a time: each spends most of its ~5 s importing TensorFlow."""
    root = tmp_path_factory.mktemp("kills")
    todo, running, done = list(SCENARIOS.items()), [], {}
    while todo or running:
        while todo and len(running) < 4:
            (kind, point), plan = todo.pop(0)
            folder = root / f"{kind}-{point}" / "checkpoints"
            steps = [h + [None] for h in plan[:-1]] + [plan[-1] + [point]]
            proc = subprocess.Popen([sys.executable, str(DRIVER), "ckpt", str(folder), json.dumps(steps)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append(((kind, point), folder, proc))
        key, folder, proc = running.pop(0)
        out, err = proc.communicate(timeout=600)
        done[key] = (folder, proc.returncode, out + err[-2000:])
    return done


def _killed(killed, kind, point) -> Path:
    folder, code, output = killed[(kind, point)]
    assert code == -signal.SIGKILL, f"not killed at {point}: {output}"
    return folder


def _reopen_and_check(folder, best_tag, latest_tag):
    model, opt = tiny_model()
    fill(model, -1.0)
    ckpts = Checkpoints(folder, model, opt)
    # nothing half-written is left, and every remaining checkpoint is whole
    leftovers = [str(p) for p in Path(folder).rglob("*") if TMP_TAG in p.name]
    assert leftovers == []
    for d in Path(folder).glob("ckpt-*"):
        assert verify(d) is None, d
    best = json.loads((Path(folder) / "best.json").read_text())
    assert tag(best["stage"], best["epoch"]) == best_tag
    assert ckpts.best_record()["checkpoint"] == best["checkpoint"]
    assert ckpts.restore_best()
    np.testing.assert_array_equal(np.concatenate([np.ravel(w) for w in model.get_weights()]), best_tag)
    latest = ckpts.latest_good()
    assert tag(*ckpts.restore(latest)) == latest_tag
    assert float(np.ravel(model.get_weights()[0])[0]) == latest_tag  # the weights, not only the numbers
    return ckpts, model


def _expected(point, acc):
    written = POINTS.index(point) >= WRITTEN
    new_best = written and acc > 0.8
    return (tag(1, 2) if new_best else tag(0, 2)), (tag(1, 2) if written else tag(1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kill_while_saving_a_new_best(killed, point):
    folder = _killed(killed, "best", point)
    best_tag, latest_tag = _expected(point, 0.9)
    ckpts, model = _reopen_and_check(folder, best_tag, latest_tag)
    # kept: the newest two, each stage's best, the best; numbering goes on past every earlier number
    names = sorted(p.name for p in folder.glob("ckpt-*"))
    kept = {"ckpt-000002", "ckpt-000004", "ckpt-000005"} if best_tag == tag(0, 2) else \
        {"ckpt-000002", "ckpt-000005", "ckpt-000006"}
    assert set(names) == kept
    fill(model, tag(1, 3))
    new = ckpts.save(1, 3, {"val_accuracy": 0.1, "val_loss": 0.9})
    assert Path(new).name > names[-1]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_rename_before_manifest", "after_manifest_before_best", "mid_prune"])
def test_kill_while_saving_a_worse_epoch_keeps_the_best(killed, point):
    folder = _killed(killed, "worse", point)
    best_tag, latest_tag = _expected(point, 0.65)
    assert best_tag == tag(0, 2)
    _reopen_and_check(folder, best_tag, latest_tag)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_data_before_rename", "after_manifest_before_best"])
def test_kill_at_the_next_stages_first_checkpoint_resumes_there_not_from_scratch(killed, point):
    """Stage 1's first checkpoint gets a new number: a kill while writing it leaves stage 0's intact."""
    folder = _killed(killed, "stage", point)
    model, opt = tiny_model()
    ckpts = Checkpoints(folder, model, opt)
    latest = ckpts.latest_good()
    expected = (1, 0) if point == "after_manifest_before_best" else (0, 2)
    assert ckpts.restore(latest) == expected
    assert [Checkpoints.manifest(c)["epoch"] for c in ckpts.checkpoints()][-2:] == (
        [2, 0] if expected == (1, 0) else [1, 2])


def test_numbers_only_grow_across_stages_and_reopenings(tmp_path):
    model, opt = tiny_model()
    ckpts = Checkpoints(tmp_path / "c", model, opt, max_to_keep=10)
    first = [ckpts.save(0, e, {"val_accuracy": 0.5, "val_loss": 1.0}) for e in (1, 2)]
    again = Checkpoints(tmp_path / "c", model, opt, max_to_keep=10)
    later = [again.save(1, 0), again.save(1, 1, {"val_accuracy": 0.5, "val_loss": 1.0})]
    names = [Path(p).name for p in first + later]
    assert names == ["ckpt-000001", "ckpt-000002", "ckpt-000003", "ckpt-000004"]
    assert [(m["stage"], m["epoch"]) for m in map(Checkpoints.manifest, again.checkpoints())] == [
        (0, 1), (0, 2), (1, 0), (1, 1)]


def test_each_stages_best_is_kept_and_restored_for_early_stopping(tmp_path):
    model, opt = tiny_model()
    ckpts = Checkpoints(tmp_path / "c", model, opt, max_to_keep=1)
    for stage, epoch, acc in [(0, 1, 0.4), (0, 2, 0.7), (0, 3, 0.5), (1, 0, 0.5), (1, 1, 0.6),
                              (1, 2, 0.65), (1, 3, 0.55)]:
        fill(model, tag(stage, epoch))
        ckpts.save(stage, epoch, {"val_accuracy": acc, "val_loss": 1 - acc})
    rec = ckpts.best_record()
    assert (rec["stage"], rec["epoch"]) == (0, 2)
    assert {s: (r["stage"], r["epoch"]) for s, r in rec["stages"].items()} == {"0": (0, 2), "1": (1, 2)}
    assert len(ckpts.checkpoints()) == 3  # the newest, stage 0's best (also the best), stage 1's best
    fill(model, 0.0)
    assert ckpts.restore_stage_best(1, epoch=2)
    assert float(model.get_weights()[0].flat[0]) == tag(1, 2)
    assert ckpts.restore_stage_best(1) and float(model.get_weights()[0].flat[0]) == tag(1, 2)
    assert not ckpts.restore_stage_best(1, epoch=1)  # pruned: not the stage's best
    assert not ckpts.restore_stage_best(5)


def test_damaged_best_json_and_best_checkpoint_fall_back(tmp_path, caplog):
    model, opt = tiny_model()
    ckpts = Checkpoints(tmp_path / "c", model, opt, max_to_keep=3)
    for epoch, acc in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        fill(model, tag(0, epoch))
        ckpts.save(0, epoch, {"val_accuracy": acc, "val_loss": 1 - acc})
    best_json = tmp_path / "c" / "best.json"
    best_json.write_text(best_json.read_text()[:20])  # cut off
    with caplog.at_level("WARNING"):
        again = Checkpoints(tmp_path / "c", model, opt, max_to_keep=3)
    assert "best.json was cut off or damaged" in caplog.text
    assert json.loads(best_json.read_text())["epoch"] == 2
    data = next((tmp_path / "c" / "ckpt-000002").glob("ckpt.data-*"))
    data.write_bytes(data.read_bytes()[:10])
    fill(model, 0.0)
    with caplog.at_level("WARNING"):
        assert again.restore_best()
    assert str(data) in caplog.text and "using the next best" in caplog.text
    assert float(model.get_weights()[0].flat[0]) == tag(0, 3)  # the next best, not the newest by chance


def test_a_checkpoint_records_the_metrics_rows_it_was_given(tmp_path):
    model, opt = tiny_model()
    ckpts = Checkpoints(tmp_path / "c", model, opt)
    rows = [{"stage": "0", "epoch": "1", "val_accuracy": "0.5"}]
    with_rows, without = ckpts.save(0, 1, rows=rows), ckpts.save(0, 2)
    assert Checkpoints.manifest(with_rows)["metrics_rows"] == rows
    assert "metrics_rows" not in Checkpoints.manifest(without)
