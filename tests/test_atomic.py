"""Atomic folder replacement (tuneflow.atomic): a reader finds the old folder or the new one, never half."""
import os

import pytest

from tuneflow.atomic import replace_dir


def _folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


def test_a_new_folder_moves_into_place(tmp_path):
    replace_dir(_folder(tmp_path / "tmp", "new"), tmp_path / "target")
    assert (tmp_path / "target" / "file.txt").read_text() == "new" and not (tmp_path / "tmp").exists()


def test_an_existing_folder_is_replaced_whole_and_nothing_is_left_aside(tmp_path):
    old = _folder(tmp_path / "target", "old")
    (old / "only_in_old.txt").write_text("x")
    replace_dir(_folder(tmp_path / "tmp", "new"), tmp_path / "target")
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["file.txt"]
    assert (tmp_path / "target" / "file.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no .target.old-* left behind


def test_a_failed_swap_keeps_the_old_folder_whole_aside(tmp_path, monkeypatch):
    _folder(tmp_path / "target", "old")
    tmp = _folder(tmp_path / "tmp", "new")
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)
    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(tmp, tmp_path / "target")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".target.old-")]
    assert len(aside) == 1 and (aside[0] / "file.txt").read_text() == "old"  # renamed aside, not deleted
    assert (tmp / "file.txt").read_text() == "new"


def _hammer(path, tag, n):
    from tuneflow.atomic import write_file
    for i in range(n):
        write_file(path, f"{tag}:" + "x" * 5000 + f":{i}")


def test_processes_writing_one_name_never_rename_each_others_file(tmp_path):
    """The feature cache's checksum file is written by every process that finishes a key: with a
    shared temporary name, one process renamed another's away (FileNotFoundError under load)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    target = tmp_path / "k.sha256"
    procs = [ctx.Process(target=_hammer, args=(target, t, 300)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    text = target.read_text()
    assert text.split(":")[0] in {"0", "1", "2", "3"} and len(text.split(":")[1]) == 5000  # one whole write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.sha256"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from tuneflow.atomic import write_file
    target = write_file(tmp_path / "a.json", "old", durable=True)

    class Boom:  # bytes-like in name only: the write fails half way, after the temporary file exists
        def __len__(self):
            return 3
    with pytest.raises(TypeError):
        write_file(target, Boom())
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
