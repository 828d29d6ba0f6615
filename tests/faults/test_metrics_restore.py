"""A run stopped after its last checkpoint and before its report, its metrics.csv then cut at any
byte, emptied or deleted: the resume writes every row back from the checkpoints (#29).

Each kind of last stage is trained once, in its own process, killed by SIGKILL while writing
report.json (``TUNEFLOW_FAULT=mid_report.json``): every checkpoint is on disk, the report is not.
Every cut of the last row and of the header then goes through the step a resume starts with
(:func:`~tuneflow.training.stages.resume_point`, milliseconds); a whole ``finetune(resume=True)``
(about 10 s each here, the same step inside it) runs for one or two cuts of each kind, and the
CLI once, as the issue's user ran it."""
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from conftest import REPO, make_image_folder, random_lite0_weights
from tuneflow import finetune
from tuneflow.runs import report as rep
from tuneflow.runs.checkpoints import Checkpoints
from tuneflow.runs.folder import RunDir
from tuneflow.training.stages import resume_point

# The three kinds of last stage: an L-BFGS head (one row, checkpointed at the stage's end), an SGD
# head on cached features (rows every epoch, one checkpoint at the stage's end), fine-tuning
# (a checkpoint every epoch) after an L-BFGS head.
KINDS = {"lbfgs": ("small_similar", []),
         "sgd": ("small_similar", ["head_solver=sgd", "head.epochs=3", "head.patience=0"]),
         "finetune": ("large_similar", ["finetune.epochs=2", "finetune.patience=0"])}
ROWS = {"lbfgs": [("0", "1")], "sgd": [("0", "1"), ("0", "2"), ("0", "3")],
        "finetune": [("0", "1"), ("1", "1"), ("1", "2")]}


def _sets():
    return ["input_size=32", "backbone=efficientnet_lite0", f"weights={random_lite0_weights()}",
            "batch_size=4", "precision=float32"]


def _cli(kind, data, out):
    recipe, sets = KINDS[kind]
    return [sys.executable, "-m", "tuneflow", "finetune", recipe, "--data", str(data), "--out", str(out)] + [
        a for s in _sets() + sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """{kind: (run folder, its metrics.csv as written, data)}: the three runs at once, each killed
    while writing its report."""
    root = tmp_path_factory.mktemp("stopped")
    data = make_image_folder(root / "d", per_class=6, size=32)
    env = {**os.environ, "TUNEFLOW_FAULT": "mid_report.json"}
    procs = {kind: subprocess.Popen(_cli(kind, data, root / kind) + ["--no-export"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for kind in KINDS}
    out = {}
    for kind, proc in procs.items():
        err = proc.communicate(timeout=600)[1]
        assert proc.returncode == -signal.SIGKILL, f"{kind} not killed mid report: {err[-3000:]}"
        run = root / kind
        assert not (run / "report.json").exists() and (run / "curves.png").exists()
        assert json.loads((run / "run.json").read_text())["status"] == "running"
        out[kind] = (run, (run / "metrics.csv").read_bytes(), data)
    return out


def _rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(data.decode().splitlines()))


def _cuts(written: bytes) -> list[int]:
    """Every length the file can be cut to inside its header or its last row (0: emptied)."""
    header_end = written.index(b"\n") + 1
    last_start = written.rstrip(b"\n").rindex(b"\n") + 1
    return list(range(0, header_end)) + list(range(last_start, len(written)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_stopped_run_is_the_kind_it_should_be(stopped, kind):
    run, written, _ = stopped[kind]
    assert [(r["stage"], r["epoch"]) for r in _rows(written)] == ROWS[kind]
    last = Checkpoints.manifest(Checkpoints(run / "checkpoints", keras.Sequential()).latest_good())
    assert (last["stage"], last["epoch"]) == (int(ROWS[kind][-1][0]) + 1, 0)  # every stage finished
    assert [tuple(r[k] for k in ("stage", "epoch")) for r in last["metrics_rows"]] == ROWS[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_cut_of_the_last_row_and_the_header_and_a_deleted_file_are_rebuilt(stopped, kind, tmp_path,
                                                                                  caplog):
    """The step every resume starts with, at every byte of the last row and of the header."""
    src, written, _ = stopped[kind]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    p = run / "metrics.csv"
    cuts = _cuts(written)
    assert len(cuts) > 80
    for cut in cuts + [None]:  # None: the file deleted
        if cut is None:
            p.unlink()
        else:
            p.write_bytes(written[:cut])
        kept = 0 if cut is None else len(_rows(written[:written[:cut].rfind(b"\n") + 1]))
        caplog.clear()
        with caplog.at_level(logging.INFO, "tuneflow"), RunDir.open(run, "x", resume=True) as folder:
            ckpt = Checkpoints(run / "checkpoints", keras.Sequential()).latest_good()
            stage, epoch, _ = resume_point(folder, ckpt)
            assert folder.metrics_history() == _rows(written)
        assert (stage, epoch) == (int(ROWS[kind][-1][0]) + 1, 0)
        assert p.read_bytes() == written, f"cut at {cut}"
        lost = len(ROWS[kind]) - kept
        assert f"metrics.csv: {lost} row{'s' * (lost != 1)} restored from checkpoint" in caplog.text, cut


# Whole resumes, one or two a kind (each ~10 s on 2 cores): a torn header, a last row cut in half,
# an emptied file, a deleted one (the CLI test below: the L-BFGS run's last row cut in half).
WHOLE = [("lbfgs", "header"), ("sgd", "empty"), ("finetune", "half"), ("finetune", "deleted")]


def _cut(p: Path, written: bytes, how: str):
    if how == "half":
        p.write_bytes(written[:len(written) - len(written.rstrip(b"\n").rsplit(b"\n", 1)[1]) // 2 - 1])
    elif how == "header":
        p.write_bytes(written[:written.index(b"\n") // 2])
    elif how == "empty":
        p.write_bytes(b"")
    else:
        p.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind, how", WHOLE)
def test_a_resumed_run_has_the_rows_of_an_uninterrupted_one_and_draws_them(stopped, kind, how, tmp_path,
                                                                           monkeypatch, caplog):
    src, written, data = stopped[kind]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _cut(run / "metrics.csv", written, how)
    (run / "curves.png").unlink()
    drawn = []
    plot = rep.plot_curves
    monkeypatch.setattr(rep, "plot_curves", lambda rows, *a, **k: (drawn.append(rows), plot(rows, *a, **k))[1])
    recipe, sets = KINDS[kind]
    with caplog.at_level(logging.INFO, "tuneflow"):
        res = finetune(recipe, str(data), run, resume=True, overrides=_sets() + sets, verbose=0, export=False)
    assert (run / "metrics.csv").read_bytes() == written
    assert drawn == [_rows(written)] and (run / "curves.png").stat().st_size > 0
    assert res.report["epochs"] == len(ROWS[kind])
    assert "restored from checkpoint" in caplog.text
    assert "feature cache" not in caplog.text  # every stage was finished: nothing trained again
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_the_cli_resume_of_the_issue_keeps_the_history(stopped, tmp_path):
    """As the issue's user: small_similar stopped before its report, metrics.csv cut in half,
    ``tuneflow finetune ... --resume``: exit 0, a report, and the run's rows. (``--no-export``, as
    the run was started: the export, ~40 s here, does not touch metrics.csv.)"""
    src, written, data = stopped["lbfgs"]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _cut(run / "metrics.csv", written, "half")
    done = subprocess.run(_cli("lbfgs", data, run) + ["--resume", "--no-export"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "metrics.csv: 1 row restored from checkpoint ckpt-" in done.stderr
    assert (run / "metrics.csv").read_bytes() == written
    assert json.loads((run / "report.json").read_text())["epochs"] == 1


def _as_older_tuneflow(run: Path):
    """The checkpoints as an earlier tuneflow wrote them: no rows in their manifests."""
    for m in (run / "checkpoints").glob("ckpt-*/manifest.json"):
        info = json.loads(m.read_text())
        del info["metrics_rows"]
        m.write_text(json.dumps(info))


@pytest.mark.slow
@pytest.mark.parametrize("kind, how, lost", [("lbfgs", "half", "at least 1 row"), ("sgd", "half", None),
                                             ("finetune", "header", "at least 2 rows")])
def test_checkpoints_without_rows_still_resume_and_say_what_cannot_be_restored(stopped, kind, how, lost,
                                                                              tmp_path, caplog):
    src, written, _ = stopped[kind]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _as_older_tuneflow(run)
    _cut(run / "metrics.csv", written, how)
    left = (run / "metrics.csv").read_bytes()
    with caplog.at_level(logging.INFO, "tuneflow"), RunDir.open(run, "x", resume=True) as folder:
        ckpt = Checkpoints(run / "checkpoints", keras.Sequential()).latest_good()
        assert resume_point(folder, ckpt)[:2] == (int(ROWS[kind][-1][0]) + 1, 0)
    rows = _rows((run / "metrics.csv").read_bytes())
    assert rows == _rows(left[:left.rfind(b"\n") + 1]) if b"\n" in left else rows == []
    if lost:  # no row of a finished stage left: that much is known to be missing
        assert f"metrics.csv: {lost} missing up to stage" in caplog.text and "cannot be restored" in caplog.text
    else:  # a lost last epoch of a stage that kept earlier rows cannot be told from an early stop
        assert "records no metrics rows" in caplog.text


@pytest.mark.slow
def test_checkpoints_without_rows_resume_through_finetune(stopped, tmp_path):
    src, written, data = stopped["lbfgs"]
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _as_older_tuneflow(run)
    _cut(run / "metrics.csv", written, "half")
    res = finetune("small_similar", str(data), run, resume=True, overrides=_sets(), verbose=0, export=False)
    assert res.report["epochs"] == 0 and _rows((run / "metrics.csv").read_bytes()) == []


def test_a_resume_without_a_usable_checkpoint_starts_its_metrics_over(tmp_path):
    """Killed before its first checkpoint (rows of a cached stage are written every epoch, its
    checkpoint only at the stage's end): the training starts over, so do its rows; a fresh run's
    folder is left alone."""
    with RunDir.open(tmp_path / "r", "x") as run:
        assert resume_point(run, None) == (0, 0, None)
        assert not (tmp_path / "r" / "metrics.csv").exists()
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
    with RunDir.open(tmp_path / "r", "x", resume=True) as run:
        assert resume_point(run, None) == (0, 0, None)
        assert run.metrics_rows() == [] and run.metrics_history() == []
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        assert [r["epoch"] for r in run.metrics_rows()] == ["1"]
