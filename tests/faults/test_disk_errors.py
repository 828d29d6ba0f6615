"""A full disk and a read-only --out: a RunError naming the path, no temporary files, earlier checkpoints intact.

Real faults where the machine allows them (a 256 KiB tmpfs filled up; a read-only bind mount: both need
root with CAP_SYS_ADMIN, otherwise those tests skip); injected OSErrors at each write step always run.
Tests run as root here, so chmod would not make a folder read-only for them.
"""
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from fault_driver import fill, tag, tiny_model
from tuneflow.errors import RunError
from tuneflow.runs import checkpoints as cmod
from tuneflow.runs import folder as fmod
from tuneflow.runs.checkpoints import Checkpoints, verify
from tuneflow.runs.folder import TMP_TAG, RunDir


def _mount(args, where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", *args, str(where)], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount(["-t", "tmpfs", "-o", "size=256k", "tmpfs"], disk):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the injected tests cover it")
    yield disk
    _umount(disk)


@pytest.fixture
def read_only(tmp_path):
    """(writable folder, the same folder mounted read-only)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    if not _mount(["--bind", str(src)], ro):
        pytest.skip("cannot bind-mount here (needs root with CAP_SYS_ADMIN); the injected tests cover it")
    if not _mount(["-o", "remount,bind,ro", str(src)], ro):
        _umount(ro)
        pytest.skip("cannot remount read-only here")
    yield src, ro
    _umount(ro)


def _fill_up(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TMP_TAG in p.name]


def _saved(ckpts, model, stage, epoch, acc):
    fill(model, tag(stage, epoch))
    return ckpts.save(stage, epoch, {"val_accuracy": acc, "val_loss": 1 - acc})


def test_a_full_disk(small_disk):
    run = RunDir.open(small_disk / "run", "x")
    try:
        model, opt = tiny_model()
        ckpts = Checkpoints(run / "checkpoints", model, opt)
        first = _saved(ckpts, model, 0, 1, 0.5)
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        best = (run.path / "checkpoints" / "best.json").read_text()
        filler = _fill_up(small_disk)
        with pytest.raises(RunError, match=r"ckpt-000002: the disk is full\. Free some space"):
            _saved(ckpts, model, 0, 2, 0.9)
        with pytest.raises(RunError, match=r"report\.json: the disk is full"):
            run.write_json("report.json", {"notes": "x" * 20000})
        with pytest.raises(RunError, match=r"metrics\.csv: the disk is full"):
            for epoch in range(2, 2000):  # the file's last block may have room for a few rows
                run.append_metrics({"stage": 0, "epoch": epoch, "val_accuracy": 0.5})
        assert _temporaries(small_disk) == []
        assert [Path(c).name for c in ckpts.checkpoints()] == ["ckpt-000001"] and verify(first) is None
        assert (run.path / "checkpoints" / "best.json").read_text() == best
        assert not (run.path / "report.json").exists()
        filler.unlink()  # space again: the run goes on where it was
        assert Path(_saved(ckpts, model, 0, 2, 0.9)).name == "ckpt-000002"
        run.append_metrics({"stage": 0, "epoch": 9, "val_accuracy": 0.9})
        assert run.metrics_rows()[-1]["epoch"] == "9"
    finally:
        run.close()


def test_a_read_only_out(read_only):
    src, ro = read_only
    with pytest.raises(RunError, match=rf"Cannot write {ro / 'run'}: the file system is read-only\. Choose a --out"):
        RunDir.open(ro / "run", "x")
    # a run written earlier, now on a read-only disk: it can be read, not resumed or extended
    with RunDir.open(src / "old", "x") as run:
        model, opt = tiny_model()
        _saved(Checkpoints(run / "checkpoints", model, opt), model, 0, 1, 0.5)
    with pytest.raises(RunError, match=rf"{ro / 'old' / '.tuneflow.lock'}: the file system is read-only"):
        RunDir.open(ro / "old", "x", resume=True)
    ckpts = Checkpoints(ro / "old" / "checkpoints", model, opt)
    with pytest.raises(RunError, match=r"ckpt-000002: the file system is read-only"):
        _saved(ckpts, model, 0, 2, 0.9)
    fill(model, 0.0)
    assert ckpts.restore_best() and float(model.get_weights()[0].flat[0]) == tag(0, 1)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_injected_full_disk_on_a_json_write(tmp_path, monkeypatch):
    with RunDir.open(tmp_path / "run", "x") as run:
        run.write_json("report.json", {"v": 1})
        monkeypatch.setattr(fmod.os, "replace", _enospc)
        with pytest.raises(RunError, match=rf"Cannot write {run.path / 'report.json'}: the disk is full"):
            run.write_json("report.json", {"v": 2})
        monkeypatch.undo()
        assert json.loads((run.path / "report.json").read_text()) == {"v": 1}
        assert _temporaries(tmp_path) == []


def test_injected_full_disk_on_a_metrics_row(tmp_path, monkeypatch):
    with RunDir.open(tmp_path / "run", "x") as run:
        run.append_metrics({"stage": 0, "epoch": 1, "val_accuracy": 0.5})
        monkeypatch.setattr(fmod.os, "fsync", _enospc)
        with pytest.raises(RunError, match=r"metrics\.csv: the disk is full"):
            run.append_metrics({"stage": 0, "epoch": 2, "val_accuracy": 0.5})


def test_injected_read_only_out_when_creating_the_folder(tmp_path, monkeypatch):
    def erofs(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "mkdir", erofs)
    with pytest.raises(RunError, match=rf"{tmp_path / 'run'}: the file system is read-only"):
        RunDir.open(tmp_path / "run", "x")


@pytest.mark.parametrize("step", ["tensorflow_write", "fsync", "rename", "manifest"])
def test_injected_failure_at_each_step_of_a_checkpoint_save(tmp_path, monkeypatch, step):
    import tensorflow as tf
    model, opt = tiny_model()
    ckpts = Checkpoints(tmp_path / "c", model, opt)
    first = _saved(ckpts, model, 0, 1, 0.5)
    best = (tmp_path / "c" / "best.json").read_text()
    if step == "tensorflow_write":
        def fail(self, *a, **k):
            raise tf.errors.ResourceExhaustedError(None, None, "write failed: No space left on device")
        monkeypatch.setattr(tf.train.Checkpoint, "write", fail)
    elif step == "fsync":
        monkeypatch.setattr(cmod.os, "fsync", _enospc)
    elif step == "rename":
        monkeypatch.setattr(cmod.os, "rename", _enospc)
    else:
        monkeypatch.setattr(fmod.os, "replace", _enospc)
    with pytest.raises(RunError, match=r"ckpt-000002(/manifest\.json)?: the disk is full"):
        _saved(ckpts, model, 0, 2, 0.9)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["best.json", "ckpt-000001"]
    assert verify(first) is None and (tmp_path / "c" / "best.json").read_text() == best
    assert _temporaries(tmp_path) == []
    assert Path(_saved(ckpts, model, 0, 2, 0.9)).name == "ckpt-000002"  # the same number, now whole
