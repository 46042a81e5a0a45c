import os

import pytest

from melecole.utils.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "out" / "result.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["result.txt"]


def test_interrupted_write_leaves_previous_file(tmp_path):
    target = tmp_path / "result.txt"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]
