"""melecole.io.formats: the registry, each format's capabilities and that they agree with behaviour; the one
temporary-name scheme of atomic writes and the stale-temporary cleaner that knows it; work arrays."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.errors import ConfigError, DataError
from melecole.io import (
    FORMATS,
    create_volume,
    ensure_work_array,
    format_modules,
    open_volume,
    open_work_array,
    parse_volume_url,
    remove_stale_temporaries,
    volume_format,
    write_volume,
)
from melecole.io.atomic import TEMPORARY_NAME, atomic_path, is_temporary_name, replace_folder, temporary_name
from melecole.io.checks import is_stale_temporary

FORMATS_FOLDER = Path(__file__).resolve().parents[1] / "melecole" / "io" / "formats"


def precomputed(path: Path) -> str:
    return f"precomputed://file://{path}"


def test_unknown_format_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"format 'tiff' is not a known format; valid: hdf5, precomputed, zarr$"):
        volume_format("tiff")
    assert volume_format("zarr") is FORMATS["zarr"]
    with pytest.raises(ConfigError, match="valid: hdf5, precomputed, zarr"):
        format_modules("zarr", "n5")


@pytest.mark.parametrize(
    "name, writable, has_keys, keys_are_folders, local, remote",
    [
        ("hdf5", False, True, False, "/data/a.hdf", None),
        ("zarr", True, True, True, "/data/a.zarr", None),
        ("precomputed", True, False, False, "file:///data/layer", "gs://bucket/layer"),
    ],
)
def test_capabilities_per_format(name, writable, has_keys, keys_are_folders, local, remote):
    entry = FORMATS[name]
    assert entry.name == name and entry.summary
    assert (entry.writable, entry.has_keys, entry.keys_are_folders) == (writable, has_keys, keys_are_folders)
    assert entry.is_local(local) and entry.is_renamable(local) == writable
    assert entry.local_path(local) == Path("/data/layer" if name == "precomputed" else local)
    if remote is not None:
        assert not entry.is_local(remote) and not entry.is_renamable(remote)
        with pytest.raises(DataError, match="not a local path"):
            entry.local_path(remote)


def test_array_path_follows_keys_are_folders():
    assert parse_volume_url("/d/out.zarr:seg/s0").array_path == Path("/d/out.zarr/seg/s0")
    assert parse_volume_url("/d/out.zarr").array_path == Path("/d/out.zarr")
    assert parse_volume_url("/d/v.hdf:raw").array_path == Path("/d/v.hdf")
    assert parse_volume_url("precomputed://file:///d/layer").array_path == Path("/d/layer")
    with pytest.raises(DataError, match="not a local path"):
        _ = parse_volume_url("gs://bucket/layer").array_path


def _imported_storage_libraries(name: str) -> set[str]:
    tree = ast.parse((FORMATS_FOLDER / f"{name}.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {n.split(".")[0] for n in names} & {"h5py", "zarr", "cloudvolume"}


def test_format_modules_are_the_libraries_each_format_imports():
    for name, entry in FORMATS.items():
        assert set(entry.modules) == _imported_storage_libraries(name), name
    assert format_modules("zarr", "hdf5") == ("zarr", "h5py")
    assert set(format_modules()) == {"zarr", "h5py", "cloudvolume"}


def test_read_only_format_has_no_writer(tmp_path):
    assert not FORMATS["hdf5"].writable
    with pytest.raises(DataError, match=r"cannot create .*writers exist for precomputed, zarr"):
        create_volume(tmp_path / "out.hdf:x", (2, 4, 4), np.uint8)
    assert list(tmp_path.iterdir()) == []


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kind", ["zarr", "zarr_key", "precomputed"])
def test_renamable_outputs_are_written_under_a_temporary_name_then_renamed(tmp_path, kind):
    urls = {"zarr": str(tmp_path / "out.zarr"), "zarr_key": f"{tmp_path / 'g.zarr'}:a/b"}
    url = urls.get(kind) or precomputed(tmp_path / "layer")
    parsed = parse_volume_url(url)
    assert parsed.volume_format.is_renamable(parsed.path)
    data = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    writer = create_volume(url, data.shape, data.dtype, chunks=(2, 8, 8))
    writer[:, :, :] = data
    temporaries = _hidden(tmp_path)
    assert len(temporaries) == 1 and TEMPORARY_NAME.match(temporaries[0]), temporaries
    assert not parsed.array_path.exists()  # nothing under the final name before the commit
    writer.commit()
    assert _hidden(tmp_path) == [] and parsed.array_path.is_dir()
    np.testing.assert_array_equal(open_volume(url)[:], data)


def test_remote_precomputed_is_not_renamable_and_is_written_in_place():
    url = "precomputed://mem://melecole-test/in-place"  # CloudVolume's in-memory store: remote, no rename
    parsed = parse_volume_url(url)
    assert not parsed.is_local and not parsed.volume_format.is_renamable(parsed.path)
    writer = create_volume(url, (4, 8, 8), np.uint8, chunks=(4, 8, 8))
    writer[:, :, :] = np.full((4, 8, 8), 9, np.uint8)
    # Visible before commit(): no temporary, written in place.
    np.testing.assert_array_equal(open_volume(url)[0:2, 0:3, 0:4], np.full((2, 3, 4), 9, np.uint8))
    writer.commit()


def test_keys_name_arrays_inside_one_store(tmp_path):
    write_volume(f"{tmp_path / 'g.zarr'}:raw", np.ones((2, 4, 4), np.uint8))
    write_volume(f"{tmp_path / 'g.zarr'}:seg/s0", np.full((2, 4, 4), 3, np.uint64))
    assert (tmp_path / "g.zarr" / "seg" / "s0").is_dir()  # a zarr key is a folder
    with pytest.raises(DataError, match=r"holds 2 arrays \(raw, seg/s0\)"):
        open_volume(tmp_path / "g.zarr")
    assert open_volume(f"{tmp_path / 'g.zarr'}:seg/s0")[0, 0, 0] == 3
    with h5py.File(tmp_path / "v.hdf", "w") as handle:
        handle["raw"] = np.zeros((2, 4, 4), np.uint8)
        handle["labels"] = np.full((2, 4, 4), 5, np.uint32)
    assert open_volume(f"{tmp_path / 'v.hdf'}:labels")[1, 1, 1] == 5
    assert open_volume(tmp_path / "v.hdf", default_key="labels").url.endswith("v.hdf:labels")


# ------------------------------------------------------------------------------- temporary names


def test_temporary_names_are_one_pattern_that_the_cleaner_knows(tmp_path):
    names = {temporary_name(tmp_path / name).name for name in ("a.hdf", "out.zarr", "last.pt", "3.npz")}
    assert len(names) == 4 and all(TEMPORARY_NAME.match(n) and is_temporary_name(n) for n in names)
    assert temporary_name(tmp_path / "x") != temporary_name(tmp_path / "x")  # random part
    assert temporary_name(tmp_path / "sub" / "v.hdf").parent == tmp_path / "sub"  # beside the target
    legacy = [".v.hdf.k2j4x_9a.tmp", ".seg.zarr.tmp-0123abcd", ".3.tmp-0123abcd.npz", ".x.old-89abcdef"]
    assert all(is_temporary_name(n) for n in legacy)
    users = [".notes.tmp", "v.hdf.0123abcd.tmp", ".v.hdf.0123abc.tmp", ".seg.zarr.tmp-0123abcg", "x.old-89abcdef"]
    assert not any(is_temporary_name(n) for n in users)


def _age(path: Path) -> None:
    old = time.time() - 3600
    for root, folders, files in os.walk(path):
        for name in folders + files:
            os.utime(os.path.join(root, name), (old, old))
    os.utime(path, (old, old))


def test_killed_writes_leave_temporaries_that_the_cleaner_removes(tmp_path):
    # Killed writers: neither commit / abort nor the end of the with block ever runs.
    writer = create_volume(tmp_path / "out.zarr", (2, 4, 4), np.uint8)
    writer[:, :, :] = np.ones((2, 4, 4), np.uint8)
    killed = atomic_path(tmp_path / "result.hdf")
    killed.__enter__().write_bytes(b"partial")
    user = [tmp_path / ".notes.tmp", tmp_path / "mine.zarr"]
    user[0].write_text("mine")
    user[1].mkdir()
    leftovers = [tmp_path / name for name in _hidden(tmp_path) if name != ".notes.tmp"]
    assert len(leftovers) == 2 and all(TEMPORARY_NAME.match(p.name) for p in leftovers)
    assert remove_stale_temporaries(tmp_path) == []  # too young: a writer may still use them
    for path in leftovers + user:
        _age(path)
    assert all(is_stale_temporary(p) for p in leftovers) and not any(is_stale_temporary(p) for p in user)
    assert remove_stale_temporaries(tmp_path) == sorted(leftovers)
    assert sorted(tmp_path.iterdir()) == sorted(user) and not (tmp_path / "result.hdf").exists()
    del killed


def test_atomic_path_for_folders_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "layer"
    for version in ("first", "second"):
        with atomic_path(target, folder=True) as temporary:
            assert TEMPORARY_NAME.match(temporary.name) and not temporary.exists()
            temporary.mkdir()
            (temporary / "info").write_text(version)
    assert (target / "info").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["layer"]
    with pytest.raises(RuntimeError):
        with atomic_path(target, folder=True) as temporary:
            temporary.mkdir()
            (temporary / "info").write_text("partial")
            raise RuntimeError("interrupted")
    assert (target / "info").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["layer"]


def test_replace_folder_moves_the_old_folder_aside_under_a_temporary_name(tmp_path, monkeypatch):
    (tmp_path / "new").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old-chunk").write_text("old")
    aside = []
    real_replace = os.replace

    def spy(source, destination):
        aside.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    replace_folder(tmp_path / "new", tmp_path / "out")
    assert TEMPORARY_NAME.match(aside[0]) and aside[1] == "out"
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------------- work arrays


def test_work_arrays_are_created_once_and_written_in_place(tmp_path):
    path = tmp_path / "fragments.zarr"
    ensure_work_array(path, (4, 8, 8), (2, 4, 4), np.uint64, (4.0, 4.0, 4.0), layer_type="segmentation")
    array = open_work_array(path)
    assert array.shape == (4, 8, 8) and array.chunks == (2, 4, 4) and int(np.asarray(array[:]).max()) == 0
    array[0:2, 0:4, 0:4] = np.full((2, 4, 4), 7, np.uint64)
    ensure_work_array(path, (4, 8, 8), (2, 4, 4), np.uint64, (4.0, 4.0, 4.0))  # a resumed run keeps it
    volume = open_volume(path)
    assert volume.resolution == (4.0, 4.0, 4.0) and int(volume[:].sum()) == 7 * 32
    assert dict(open_work_array(path).attrs)["layer_type"] == "segmentation"
