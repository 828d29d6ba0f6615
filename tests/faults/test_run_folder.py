"""The run folder under faults: foreign files, two processes, kill -9, torn and damaged files, resume checks."""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_image_folder
from tuneflow.errors import RunError
from tuneflow.runs import folder as fmod
from tuneflow.runs.folder import LOCK, MARKER, TMP_TAG, RunDir, RunExistsError, RunLockedError

DRIVER = Path(__file__).with_name("fault_driver.py")
RECIPE = {"name": "large_similar", "batch_size": 32, "weights": "imagenet", "classes": [],
          "stages": [{"name": "head", "lr": 0.001, "epochs": 30}, {"name": "finetune", "lr": 3e-05, "epochs": 3}]}


def _tuneflow_run(path: Path) -> Path:
    """A run folder with what tuneflow writes: JSON, metrics, a checkpoint, TensorBoard events."""
    with RunDir.open(path, "x") as run:
        run.start(RECIPE, "f" * 16)
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        ck = run / "checkpoints" / "ckpt-000001"
        ck.mkdir(parents=True)
        (ck / "ckpt.index").write_bytes(b"i")
        (ck / "manifest.json").write_text("{}")
        (run / "checkpoints" / "best.json").write_text("{}")
        ev = run / "tensorboard" / "head" / "train"
        ev.mkdir(parents=True)
        (ev / "events.out.tfevents.1.host").write_bytes(b"e")
        (run / "report.md").write_text("# report")
        (path / "model").mkdir()  # written through run.path by the exporter: a name tuneflow owns
        (path / "model" / "saved_model.pb").write_bytes(b"m")
    return path


def test_overwrite_removes_only_tuneflows_files_and_keeps_the_folder(tmp_path):
    run = _tuneflow_run(tmp_path / "r")
    with RunDir.open(run, "x", overwrite=True) as again:
        assert again.fresh
        assert sorted(p.name for p in run.iterdir()) == [MARKER, LOCK]
        assert json.loads((run / MARKER).read_text())["names"] == [LOCK]


@pytest.mark.parametrize("foreign", ["notes.txt", "checkpoints/mine.txt", "tensorboard/head/plot.png", "data/"])
def test_overwrite_refuses_naming_files_tuneflow_did_not_write(tmp_path, foreign):
    run = _tuneflow_run(tmp_path / "r")
    target = run / foreign
    if foreign.endswith("/"):
        target.mkdir()
    else:
        target.write_text("precious")
    before = sorted(str(p) for p in run.rglob("*"))
    with pytest.raises(RunExistsError, match="did not write") as err:
        RunDir.open(run, "x", overwrite=True)
    assert foreign in str(err.value) and str(run) in str(err.value)
    assert sorted(str(p) for p in run.rglob("*")) == before  # nothing deleted, nothing added
    assert target.exists()


@pytest.mark.parametrize("mode", ["plain", "overwrite", "resume"])
def test_a_folder_that_is_not_a_run_gets_nothing_written(tmp_path, mode):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(RunExistsError, match="thesis.tex"):
        RunDir.open(mine, "x", overwrite=mode == "overwrite", resume=mode == "resume")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]  # no lock file, no marker


def test_an_older_run_without_a_marker_is_overwritten_by_known_names_only(tmp_path):
    old = tmp_path / "old"
    (old / "checkpoints" / "last").mkdir(parents=True)
    (old / "run.json").write_text("{}")
    (old / "checkpoints" / "last" / "ckpt-3.index").write_bytes(b"i")
    (old / "checkpoints" / "last" / "checkpoint").write_text("x")
    (old / "mine.csv").write_text("precious")
    with pytest.raises(RunExistsError, match="mine.csv"):
        RunDir.open(old, "x", overwrite=True)
    (old / "mine.csv").unlink()
    RunDir.open(old, "x", overwrite=True).close()
    assert sorted(p.name for p in old.iterdir()) == [MARKER, LOCK]


def test_a_second_process_is_refused_naming_the_folder_and_pid_and_a_kill_releases_the_lock(tmp_path):
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, str(DRIVER), "hold", str(run)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for mode in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunLockedError) as err:
                RunDir.open(run, "x", **mode)
            assert str(run) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert (run / MARKER).exists()  # the refused opens removed nothing
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == -signal.SIGKILL
    with RunDir.open(run, "x", resume=True) as again:  # the kernel dropped the dead holder's lock
        assert again.locked and not again.fresh
        assert (run / LOCK).read_text().startswith(f"{os.getpid()}@")


def test_the_lock_is_held_until_close_in_the_same_process(tmp_path):
    first = RunDir.open(tmp_path / "r", "x")
    with pytest.raises(RunLockedError, match="this very process"):
        RunDir.open(tmp_path / "r", "x", resume=True)
    first.close()
    first.close()  # twice is harmless
    with RunDir.open(tmp_path / "r", "x", resume=True) as again:
        assert again.locked
    assert not again.locked


def test_a_failed_fresh_run_removes_only_its_own_files(tmp_path):
    made = RunDir.open(tmp_path / "new", "x")
    made.status("running")
    assert made.discard_if_fresh() and not (tmp_path / "new").exists()

    existing = tmp_path / "empty"
    existing.mkdir()
    run = RunDir.open(existing, "x")
    run.status("running")
    (existing / "written-meanwhile.txt").write_text("not ours")
    assert run.discard_if_fresh()
    assert [p.name for p in existing.iterdir()] == ["written-meanwhile.txt"]
    assert not run.locked


def test_a_run_with_a_checkpoint_is_kept_when_it_fails(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        (run / "checkpoints" / "ckpt-000001").mkdir(parents=True)
        (run.path / "checkpoints" / "ckpt-000001" / "manifest.json").write_text("{}")
        assert not run.discard_if_fresh()
    assert (tmp_path / "r" / "checkpoints").exists()


# -- resume checks ------------------------------------------------------------------------------
def _changed(**top):
    r = json.loads(json.dumps(RECIPE))
    r["stages"][0]["lr"] = 0.003
    r.update(top)
    return r


def test_resume_names_every_difference_and_keeps_recipe_json(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.start(RECIPE, "a" * 16)
    stored = (tmp_path / "r" / "recipe.json").read_text()
    with RunDir.open(tmp_path / "r", "x", resume=True) as run:
        with pytest.raises(RunError) as err:
            run.start(_changed(batch_size=16), "b" * 16)
        msg = str(err.value)
        assert "head.lr: 0.001 -> 0.003" in msg and "batch_size: 32 -> 16" in msg
        assert f"data: fingerprint {'a' * 16} -> {'b' * 16}" in msg and "--force" in msg
        assert "finetune.lr" not in msg  # only what differs
        assert (tmp_path / "r" / "recipe.json").read_text() == stored  # not overwritten
        assert run.check_resume(RECIPE, "a" * 16) == []
        # Recipe.to_dict() holds tuples where recipe.json holds lists: the same recipe
        as_tuples = {**RECIPE, "classes": (), "stages": tuple(RECIPE["stages"])}
        assert run.check_resume(as_tuples, "a" * 16) == []


def test_resume_with_force_continues_and_records_the_changes(tmp_path, caplog):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.start(RECIPE, "a" * 16)
    with RunDir.open(tmp_path / "r", "x", resume=True) as run, caplog.at_level(logging.WARNING):
        changes = run.start(_changed(), "a" * 16, force=True)
    assert changes == ["head.lr: 0.001 -> 0.003"]
    assert "head.lr: 0.001 -> 0.003" in caplog.text
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["stages"][0]["lr"] == 0.003
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["resumed_with_changes"][0]["changes"] == changes


def test_stage_renamed_or_added_is_a_difference(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.start(RECIPE, None)
    three = json.loads(json.dumps(RECIPE))
    three["stages"].append({"name": "all", "lr": 1e-5, "epochs": 1})
    with RunDir.open(tmp_path / "r", "x", resume=True) as run:
        with pytest.raises(RunError, match=r'stages: \["head", "finetune"\] -> \["head", "finetune", "all"\]'):
            run.check_resume(three, None)
        assert run.check_resume(_changed(), None, ignore=("head.lr",)) == []


@pytest.mark.parametrize("name", ["recipe.json", "run.json"])
def test_a_damaged_recipe_or_run_json_is_named_on_resume(tmp_path, name):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.start(RECIPE, "a" * 16)
    p = tmp_path / "r" / name
    p.write_text(p.read_text()[:15])
    with RunDir.open(tmp_path / "r", "x", resume=True) as run:
        with pytest.raises(RunError) as err:
            run.check_resume(RECIPE, "a" * 16)
        assert str(p) in str(err.value) and "--force" in str(err.value)
        assert run.start(RECIPE, "a" * 16, force=True) is not None  # --force: resumed, files rewritten
    assert json.loads(p.read_text())


def test_status_rebuilds_a_cut_off_run_json(tmp_path, caplog):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.status("running", recipe="x")
        (tmp_path / "r" / "run.json").write_text('{"status": "run')
        with caplog.at_level(logging.WARNING):
            run.status("failed", error="boom")
    assert "run.json is damaged or cut off" in caplog.text
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_read_json_names_the_file_and_what_to_do(tmp_path):
    p = tmp_path / "report.json"
    p.write_text('{"val_accuracy": 0.9')
    with pytest.raises(RunError, match=rf"{p} is damaged or cut off .*--overwrite"):
        fmod.read_json(p)


# -- metrics.csv ----------------------------------------------------------------------------------
def test_metrics_are_appended_not_rewritten(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5, "lr": 0.001})
        p = tmp_path / "r" / "metrics.csv"
        inode, first = p.stat().st_ino, p.read_bytes()
        run.append_metrics({"stage": 0, "epoch": 2, "val_accuracy": 0.625, "lr": 0.001})
        assert p.stat().st_ino == inode and p.read_bytes().startswith(first)
        assert [(r["epoch"], r["val_accuracy"]) for r in run.metrics_rows()] == [("1", "0.5"), ("2", "0.625")]
        run.truncate_metrics(lambda s, e: e <= 1)
        assert [r["epoch"] for r in run.metrics_rows()] == ["1"]


@pytest.mark.parametrize("tail", [b"0,3,0.4,0.8,0.", b"0,3,0.4\x00\x00\x00", b"\x00\x00"])
def test_a_torn_last_line_is_dropped_on_read_and_repaired_before_the_next_append(tmp_path, caplog, tail):
    with RunDir.open(tmp_path / "r", "x") as run:
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        run.append_metrics({"stage": 0, "epoch": 2, "val_accuracy": 0.6})
        p = tmp_path / "r" / "metrics.csv"
        with open(p, "ab") as f:
            f.write(tail)
        with caplog.at_level(logging.WARNING):
            assert [r["epoch"] for r in run.metrics_rows()] == ["1", "2"]
        assert "torn last line" in caplog.text or not tail.strip(b"\0")
        run.append_metrics({"stage": 0, "epoch": 3, "val_accuracy": 0.7})
        assert [r["epoch"] for r in run.metrics_rows()] == ["1", "2", "3"]
        assert p.read_bytes().endswith(b"\n0,3,,,,0.7,,\n")


def test_a_torn_header_leaves_an_empty_table_that_the_next_append_rebuilds(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        (tmp_path / "r" / "metrics.csv").write_bytes(b"stage,epo")
        assert run.metrics_rows() == []
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        assert (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0] == ",".join(fmod.FIELDS)


@pytest.mark.slow
def test_kill_mid_metrics_row_and_mid_run_json_write(tmp_path):
    """A real SIGKILL with half a row on disk, and one between run.json's temporary and its rename."""
    with RunDir.open(tmp_path / "r", "x") as run:
        run.status("running", epoch=1)
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.25})
    procs = [subprocess.run([sys.executable, str(DRIVER), mode, str(tmp_path / "r"), fault], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
             for mode, fault in (("metrics", "mid_metrics_row"), ("json", "mid_run.json"))]
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, [p.stderr[-1500:] for p in procs]
    r = tmp_path / "r"
    assert (r / "metrics.csv").read_bytes().endswith(b"\n0,3,,,,")  # half of the row "0,3,,,,0.75,,\n"
    assert [p.name for p in r.iterdir() if TMP_TAG in p.name]  # the cut-off run.json temporary
    assert json.loads((r / "run.json").read_text())["epoch"] == 1  # run.json itself: the old one, whole
    with RunDir.open(r, "x", resume=True) as run:
        assert [row["epoch"] for row in run.metrics_rows()] == ["1", "2"]
        run.append_metrics({"stage": 0, "epoch": 3, "val_accuracy": 0.75})
        assert [row["val_accuracy"] for row in run.metrics_rows()] == ["0.25", "0.5", "0.75"]
        assert run.foreign_files() == []  # the leftover temporary is recognisably tuneflow's
    with RunDir.open(r, "x", overwrite=True):
        assert sorted(p.name for p in r.iterdir()) == [MARKER, LOCK]


def test_fault_points_fire_on_the_nth_pass_only(monkeypatch):
    kills = []
    monkeypatch.setattr(fmod.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(fmod, "_fault_counts", {})
    monkeypatch.setenv("TUNEFLOW_FAULT", "somewhere@2")
    fmod.fault("elsewhere")
    fmod.fault("somewhere")
    assert kills == []
    fmod.fault("somewhere")
    assert kills == [(os.getpid(), signal.SIGKILL)]


@pytest.mark.slow
def test_cli_refuses_a_locked_run_folder_in_one_line(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4, size=16)
    run = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, str(DRIVER), "hold", str(run)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run([sys.executable, "-m", "tuneflow", "finetune", "small_similar", "--data", str(data),
                              "--out", str(run), "--resume", "--set", "input_size=32", "--set", "weights=None"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait(30)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"in use by another tuneflow run (pid {holder.pid}" in out.stderr
    assert "Traceback" not in out.stderr


# -- metrics.csv rebuilt on resume from the rows a checkpoint recorded (#29) ----------------------
def _three_rows(run):
    for stage, epoch, acc in [(0, 1, 0.5), (0, 2, 0.625), (1, 1, 0.75)]:
        run.append_metrics({"stage": stage, "epoch": epoch, "val_accuracy": acc, "lr": 0.001, "seconds": 0.25})


def test_the_history_a_checkpoint_records_is_the_file_as_written(tmp_path):
    with RunDir.open(tmp_path / "r", "x") as run:
        assert run.metrics_history() == []
        _three_rows(run)
        history = run.metrics_history()
        assert history == run.metrics_rows()
        assert history[1] == {"stage": "0", "epoch": "2", "loss": "", "accuracy": "", "val_loss": "",
                              "val_accuracy": "0.625", "lr": "0.001", "seconds": "0.25"}
        history.clear()  # a copy: the run's own is untouched
        assert len(run.metrics_history()) == 3


@pytest.mark.parametrize("damage", ["second row cut", "header cut", "emptied", "deleted", "rows swapped"])
def test_rebuild_metrics_writes_back_what_the_file_lost_in_order(tmp_path, caplog, damage):
    with RunDir.open(tmp_path / "r", "x") as run:
        _three_rows(run)
        known, written = run.metrics_history(), (tmp_path / "r" / "metrics.csv").read_bytes()
    p = tmp_path / "r" / "metrics.csv"
    lines = written.splitlines(keepends=True)
    if damage == "second row cut":
        p.write_bytes(b"".join(lines[:2]) + lines[2][:7])
    elif damage == "header cut":
        p.write_bytes(lines[0][:9])
    elif damage == "emptied":
        p.write_bytes(b"")
    elif damage == "deleted":
        p.unlink()
    else:
        p.write_bytes(lines[0] + lines[2] + lines[1] + lines[3])
    lost = {"second row cut": 2, "header cut": 3, "emptied": 3, "deleted": 3, "rows swapped": 0}[damage]
    with RunDir.open(tmp_path / "r", "x", resume=True) as run:
        assert run.rebuild_metrics(lambda s, e: True, known) == lost
        assert p.read_bytes() == written
        assert run.metrics_history() == known
        # resumed at stage 0's end: stage 1's row is dropped (trained again), the rest kept
        assert run.rebuild_metrics(lambda s, e: s < 1, known) == 0
        assert [(r["stage"], r["epoch"]) for r in run.metrics_rows()] == [("0", "1"), ("0", "2")]
        run.append_metrics({"stage": 1, "epoch": 1, "val_accuracy": 0.75, "lr": 0.001, "seconds": 0.25})
        assert p.read_bytes() == written


def test_rebuild_metrics_leaves_a_whole_file_alone_and_ignores_malformed_recorded_rows(tmp_path, caplog):
    with RunDir.open(tmp_path / "r", "x") as run:
        _three_rows(run)
        known = run.metrics_history()
        p = tmp_path / "r" / "metrics.csv"
        inode = p.stat().st_ino
        assert run.rebuild_metrics(lambda s, e: True, known) == 0
        assert p.stat().st_ino == inode  # nothing to rebuild: not rewritten
        with caplog.at_level(logging.WARNING):
            assert run.rebuild_metrics(lambda s, e: True, known + [{"stage": "x", "epoch": 1}, "junk"]) == 0
        assert caplog.text.count("malformed metrics row") == 2
        assert run.metrics_rows() == known
