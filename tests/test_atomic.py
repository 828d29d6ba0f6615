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
