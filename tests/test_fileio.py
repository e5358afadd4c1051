import os

import pytest

from d3s2.fileio import atomic_open, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["a.txt"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as fh:
            fh.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    with open(tmp_path / "b.txt", "w") as fh:
        fh.write("x")
    assert (os.stat(tmp_path / "a.txt").st_mode & 0o777) == (os.stat(tmp_path / "b.txt").st_mode & 0o777)
