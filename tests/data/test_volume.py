"""Reading HDF5 volumes: layout checks and one-line errors naming file, key and config field."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.config import get_default_cfg
from melecole.data.volume import check_data_root, list_volumes, normalize_raw, read_volume
from melecole.errors import DataError


def write_volume(
    path: Path, raw: np.ndarray, labels: np.ndarray | None = None, raw_key: str = "volume"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle[raw_key] = raw
        if labels is not None:
            handle["labels"] = labels
    return path


def test_padded_volume(tmp_path: Path) -> None:
    raw = np.arange(4 * 8 * 10, dtype=np.uint8).reshape(4, 8, 10)
    labels = np.ones((2, 4, 4), dtype=np.uint64)
    path = write_volume(tmp_path / "a.hdf", raw, labels)
    volume = read_volume(path, padding=(1, 2, 3))
    assert volume.padding == (1, 2, 3)
    assert volume.shape == (2, 4, 4)
    assert volume.raw.dtype == np.uint8 and volume.labels.dtype == np.uint64
    assert volume.path == path


def test_unpadded_raw_with_padding_config_uses_zero_padding(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.h5", np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 5), np.int32))
    volume = read_volume(path, padding=(1, 1, 1))
    assert volume.padding == (0, 0, 0)
    assert volume.labels.dtype == np.uint32  # signed ids are converted


def test_without_labels(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.hdf", np.zeros((3, 4, 5), np.uint8))
    volume = read_volume(path, label_key=None, padding=(1, 1, 1))
    assert volume.labels is None and volume.shape == (3, 4, 5) and volume.padding == (0, 0, 0)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.hdf' does not exist"):
        read_volume(tmp_path / "nope.hdf")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "text.hdf"
    path.write_text("not hdf5")
    with pytest.raises(DataError, match="text.hdf' is not a readable HDF5 file"):
        read_volume(path)


def test_missing_raw_key_names_field_and_keys(tmp_path: Path) -> None:
    zeros = np.zeros((2, 2, 2), np.uint8)
    path = write_volume(tmp_path / "a.hdf", zeros, zeros.astype(np.uint32), raw_key="raw")
    with pytest.raises(DataError) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message and "'volume'" in message and "DATASET.RAW_KEY" in message
    assert "labels, raw" in message


def test_missing_label_key(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.hdf", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"key 'gt' not found \(DATASET.LABEL_KEY\).*keys: volume"):
        read_volume(path, label_key="gt")


def test_not_3d(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.hdf", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"must be 3D \(z, y, x\), got shape \(2, 2\)"):
        read_volume(path, label_key=None)


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.hdf", np.zeros((4, 6, 6), np.uint8), np.zeros((2, 2, 2), np.uint32))
    with pytest.raises(DataError) as info:
        read_volume(path, padding=(1, 1, 1))
    message = str(info.value)
    assert str(path) in message and "(4, 6, 6)" in message and "(2, 2, 2)" in message
    assert "DATASET.PADDING" in message and "\n" not in message


def test_float_labels_rejected(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.hdf", np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.float32))
    with pytest.raises(DataError, match="must be integer ids"):
        read_volume(path)


def test_normalize_raw() -> None:
    assert np.allclose(normalize_raw(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0])
    twelve_bit = np.array([100, 1100, 4095], np.uint16)
    out = normalize_raw(twelve_bit)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.allclose(normalize_raw(np.array([0.25, 0.5], np.float32)), [0.25, 0.5])
    assert np.allclose(normalize_raw(np.array([-1.0, 3.0]), (-1.0, 1.0)), [0.0, 1.0])  # clipped
    constant = normalize_raw(np.full(3, 7, np.uint16))
    assert np.all(np.isfinite(constant))


def test_volume_value_range_from_whole_volume(tmp_path: Path) -> None:
    raw = np.linspace(1000, 3000, 2 * 3 * 4).astype(np.uint16).reshape(2, 3, 4)
    volume = read_volume(write_volume(tmp_path / "a.hdf", raw), label_key=None)
    assert volume.value_range == (1000.0, 3000.0)
    assert normalize_raw(volume.raw[:1], volume.value_range).min() == 0.0


def test_list_volumes(tmp_path: Path) -> None:
    for name in ("b.hdf", "a.h5", "c.hdf5", "notes.txt"):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"")
    assert [p.name for p in list_volumes(tmp_path, "train")] == ["a.h5", "b.hdf", "c.hdf5"]


def test_list_volumes_missing_folder(tmp_path: Path) -> None:
    expected = (
        f"DATASET.DATA_ROOT: folder '{tmp_path}/val' does not exist "
        "(expected HDF5 volumes in <DATA_ROOT>/val/*.hdf)"
    )
    with pytest.raises(DataError) as info:
        list_volumes(tmp_path, "val")
    assert str(info.value) == expected


def test_list_volumes_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no HDF5 volume"):
        list_volumes(tmp_path, "train")


def test_check_data_root(tmp_path: Path) -> None:
    write_volume(tmp_path / "train" / "a.hdf", np.zeros((1, 1, 1), np.uint8))
    cfg = get_default_cfg()
    cfg.DATASET.DATA_ROOT = str(tmp_path)
    assert list(check_data_root(cfg, ["train"])) == ["train"]
    with pytest.raises(DataError, match="val"):
        check_data_root(cfg, ["train", "val"])
