"""Training patches and loaders: determinism in (seed, rank, index), redraws, relabelling, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.config import get_default_cfg
from melecole.data.dataset import (
    TrainDataset,
    build_train_loader,
    build_val_batches,
    crop_padded,
    mask_boundaries,
    relabel_components,
)
from melecole.data.volume import Volume, read_volume
from melecole.errors import DataError

PATCH = [4, 16, 16]


def block_labels(shape: tuple[int, int, int], block: int = 4) -> np.ndarray:
    """Blocks of `block` voxels in y and x, sections of 2 in z, each its own id."""
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    ids = (z // 2) * 10000 + (y // block) * 100 + (x // block) + 1
    return ids.astype(np.uint64)


def write_split(root: Path, split: str, shape=(6, 24, 24), padding=(1, 2, 2), count: int = 2) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(split))
    for i in range(count):
        labels = block_labels(shape)
        raw_shape = tuple(s + 2 * p for s, p in zip(shape, padding))
        with h5py.File(folder / f"vol{i}.hdf", "w") as handle:
            handle["volume"] = rng.integers(0, 256, raw_shape, dtype=np.uint8)
            handle["labels"] = labels


@pytest.fixture
def cfg(tmp_path: Path):
    write_split(tmp_path, "train")
    cfg = get_default_cfg()
    cfg.DATASET.DATA_ROOT = str(tmp_path)
    cfg.DATASET.PADDING = [1, 2, 2]
    cfg.MODEL.INPUT_SIZE = PATCH
    cfg.OPTIM.BATCH_SIZE = 2
    cfg.HARDWARE.NUM_WORKERS = 0
    cfg.HARDWARE.DEVICE = "cpu"
    cfg.AUGMENTATION.ELASTIC.P = 1.0
    cfg.AUGMENTATION.MISALIGNMENT.P = 1.0
    cfg.LOG.VAL_PATCHES = 3
    return cfg


def make_dataset(cfg, rank: int = 0, **overrides) -> TrainDataset:
    from melecole.data.augment import build_augmentor
    from melecole.data.dataset import read_volumes

    arguments = dict(
        augmentor=build_augmentor(cfg),
        seed=cfg.SYSTEM.SEED,
        rank=rank,
        min_labeled_fraction=cfg.DATASET.MIN_LABELED_FRACTION,
        max_redraws=cfg.DATASET.MAX_REDRAWS,
        min_object_size=cfg.DATASET.MIN_OBJECT_SIZE,
    )
    arguments.update(overrides)
    return TrainDataset(read_volumes(cfg, "train"), cfg.MODEL.INPUT_SIZE, **arguments)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_shapes_and_dtypes(cfg) -> None:
    sample = make_dataset(cfg)[0]
    assert sample["raw"].shape == (1, *PATCH) and sample["raw"].dtype == torch.float32
    assert sample["labels"].shape == tuple(PATCH) and sample["labels"].dtype == torch.int64
    assert 0.0 <= sample["raw"].min() and sample["raw"].max() <= 1.0
    assert sample["labels"].max() > 1


def test_same_index_same_patch_across_instances(cfg) -> None:
    first, second = make_dataset(cfg), make_dataset(cfg)
    for index in (0, 5, 123456789):
        assert_same(first[index], second[index])
    assert not torch.equal(first[0]["raw"], first[1]["raw"])


def test_ranks_differ(cfg) -> None:
    assert not torch.equal(make_dataset(cfg, rank=0)[3]["raw"], make_dataset(cfg, rank=1)[3]["raw"])


def test_loader_workers_and_resume_are_exact(cfg) -> None:
    serial = iter(build_train_loader(cfg))
    batches = [next(serial) for _ in range(3)]
    assert batches[0]["raw"].shape == (2, 1, *PATCH) and batches[0]["labels"].shape == (2, *PATCH)
    cfg.HARDWARE.NUM_WORKERS = 2
    parallel = iter(build_train_loader(cfg))
    for expected in batches:
        assert_same(next(parallel), expected)
    del parallel
    cfg.HARDWARE.NUM_WORKERS = 0
    resumed = iter(build_train_loader(cfg, start_iteration=2))
    assert_same(next(resumed), batches[2])
    other_rank = iter(build_train_loader(cfg, rank=1, world_size=2))
    assert not torch.equal(next(other_rank)["raw"], batches[0]["raw"])


def half_labelled_volume() -> Volume:
    labels = block_labels((4, 32, 32))
    labels[:, :, :16] = 0  # left half unlabelled
    raw = np.zeros((4, 32, 32), np.uint8)
    return Volume(raw=raw, labels=labels, padding=(0, 0, 0), path=Path("half.hdf"))


def test_label_free_patches_are_redrawn() -> None:
    volume = half_labelled_volume()
    strict = TrainDataset([volume], (4, 16, 16), min_labeled_fraction=0.9, max_redraws=50)
    lenient = TrainDataset([volume], (4, 16, 16), min_labeled_fraction=0.0)
    strict_fractions = [float((strict[i]["labels"] != 0).float().mean()) for i in range(20)]
    lenient_fractions = [float((lenient[i]["labels"] != 0).float().mean()) for i in range(20)]
    assert min(strict_fractions) >= 0.9
    assert min(lenient_fractions) < 0.9


def test_unlabelled_volume_keeps_last_draw_without_crashing() -> None:
    volume = Volume(np.zeros((4, 16, 16), np.uint8), np.zeros((4, 16, 16), np.uint32), (0, 0, 0), Path("x"))
    sample = TrainDataset([volume], (2, 8, 8), min_labeled_fraction=0.5, max_redraws=3)[0]
    assert sample["labels"].abs().sum() == 0


def test_relabel_splits_disconnected_object_and_drops_small_pieces() -> None:
    labels = np.zeros((1, 4, 9), np.uint64)
    labels[0, :, 0:3] = 7  # piece one of id 7
    labels[0, :, 5:8] = 7  # piece two of id 7, separated by background
    labels[0, :, 3] = 9  # id 9 touches piece one: stays a different object
    labels[0, 0, 8] = 7  # a single voxel touching piece two stays with it
    out = relabel_components(labels)
    assert out.dtype == np.int64
    assert out[0, 0, 0] != out[0, 0, 5] and out[0, 0, 0] != out[0, 0, 3]
    assert out[0, 0, 8] == out[0, 0, 5]
    assert set(np.unique(out)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(out == 0, labels == 0)
    # diagonal contact does not connect (6-connectivity); pieces below the minimum size vanish
    corner = np.zeros((1, 3, 3), np.uint64)
    corner[0, 0, 0] = corner[0, 1, 1] = 5
    corner[0, 2, :] = 6
    out = relabel_components(corner, min_object_size=2)
    assert out[0, 0, 0] == 0 and out[0, 1, 1] == 0 and out[0, 2, 0] == 1


def test_tiny_volume_is_padded(tmp_path: Path) -> None:
    raw, labels = np.full((2, 5, 5), 200, np.uint8), np.ones((2, 5, 5), np.uint32)
    volume = Volume(raw=raw, labels=labels, padding=(0, 0, 0), path=tmp_path)
    dataset = TrainDataset([volume], (4, 8, 8), min_labeled_fraction=0.5, max_redraws=2)
    sample = dataset[0]
    assert sample["raw"].shape == (1, 4, 8, 8)
    assert int((sample["labels"] != 0).sum()) == 2 * 5 * 5  # the volume's voxels, 0 elsewhere
    assert torch.allclose(sample["raw"], torch.tensor(200 / 255))  # reflected raw


def test_unlabelled_mode_returns_raw_only(cfg) -> None:
    loader = iter(build_train_loader(cfg, labeled=False))
    batch = next(loader)
    assert list(batch) == ["raw"] and batch["raw"].shape == (2, 1, *PATCH)


def test_raw_index_is_label_index_plus_padding(tmp_path: Path) -> None:
    padding = (1, 2, 3)
    labels = block_labels((4, 8, 8), block=1)
    raw = np.zeros(tuple(s + 2 * p for s, p in zip(labels.shape, padding)), np.uint8)
    inner = tuple(slice(p, p + s) for p, s in zip(padding, labels.shape))
    raw[inner] = (labels % 251).astype(np.uint8)
    with h5py.File(tmp_path / "a.hdf", "w") as handle:
        handle["volume"], handle["labels"] = raw, labels
    volume = read_volume(tmp_path / "a.hdf", padding=padding)
    dataset = TrainDataset([volume], (2, 4, 4))
    for index in range(5):
        rng = dataset.rng(index)
        _, start = dataset._draw_box(rng)
        sample = dataset[index]
        expected_labels = crop_padded(labels, start, (2, 4, 4))
        expected_raw = (expected_labels % 251).astype(np.float32) / 255
        assert torch.allclose(sample["raw"][0], torch.from_numpy(expected_raw))


def test_val_batches(cfg, tmp_path: Path) -> None:
    write_split(tmp_path, "val", count=1)
    batches = build_val_batches(cfg)
    assert [b["raw"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["labels"].shape == (2, *PATCH)
    again = build_val_batches(cfg)
    for a, b in zip(batches, again):
        assert_same(a, b)


def test_val_batches_missing_folder_warns(cfg, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert build_val_batches(cfg) == []
    assert "does not exist" in caplog.text


def test_loader_errors_name_key_shape_and_folder(cfg, tmp_path: Path) -> None:
    cfg.DATASET.RAW_KEY = "raw"
    with pytest.raises(DataError, match=r"key 'raw' not found \(DATASET.RAW_KEY\).*keys: labels, volume"):
        build_train_loader(cfg)
    cfg.DATASET.RAW_KEY = "volume"
    cfg.DATASET.PADDING = [0, 1, 1]
    with pytest.raises(DataError, match=r"raw shape \(8, 28, 28\) must equal the label shape \(6, 24, 24\)"):
        build_train_loader(cfg)
    cfg.DATASET.DATA_ROOT = str(tmp_path / "missing")
    with pytest.raises(DataError, match="DATASET.DATA_ROOT: folder .*missing/train' does not exist"):
        build_train_loader(cfg)


def test_crop_padded() -> None:
    array = np.arange(5).reshape(1, 1, 5)
    np.testing.assert_array_equal(crop_padded(array, (0, 0, -2), (1, 1, 4)), [[[0, 0, 0, 1]]])
    np.testing.assert_array_equal(crop_padded(array, (0, 0, 3), (1, 1, 4), mode="reflect"), [[[3, 4, 3, 2]]])
    view = crop_padded(array, (0, 0, 1), (1, 1, 2))
    view[...] = -1
    assert array.min() == 0  # always a copy


def test_crop_padded_reflect_matches_numpy_pad() -> None:
    array = np.random.default_rng(0).integers(0, 100, (3, 4, 5))
    padded = np.pad(array, 9, mode="reflect")
    for start, size in [((-2, -3, 1), (4, 6, 8)), ((1, 2, -9), (3, 9, 7)), ((0, 0, 0), (3, 4, 5))]:
        expected = padded[tuple(slice(s + 9, s + 9 + n) for s, n in zip(start, size))]
        np.testing.assert_array_equal(crop_padded(array, start, size, mode="reflect"), expected)


def test_mask_boundaries_marks_both_sides_of_an_interface() -> None:
    labels = np.zeros((1, 4, 6), dtype=np.int64)
    labels[0, :, :3] = 1
    labels[0, :, 3:5] = 2  # column 5 stays 0: unlabelled voxels do not grow
    masked = mask_boundaries(labels, 1)
    expected = labels.copy()
    expected[0, :, 2:4] = 0
    np.testing.assert_array_equal(masked, expected)
    wide = mask_boundaries(labels, 2)
    assert np.all(wide[0, :, 1:5] == 0) and np.all(wide[0, :, 0] == 1)
    assert mask_boundaries(labels, 0) is labels
    np.testing.assert_array_equal(labels[0, 0], [1, 1, 1, 2, 2, 0])  # input untouched


def test_mask_boundaries_grows_the_boundary_class_with_background_width() -> None:
    labels = np.ones((3, 5, 9), dtype=np.int64)
    labels[:, :, 4] = 0  # a one-voxel boundary class between two objects, as in fib-gala
    labels[:, :, 5:] = 2
    grown = mask_boundaries(labels, 0, background_width=1)
    expected = labels.copy()
    expected[:, :, 3:6] = 0  # the wall is now 3 voxels thick; the objects keep the rest
    np.testing.assert_array_equal(grown, expected)
    two = mask_boundaries(labels, 0, background_width=2)
    assert np.all(two[:, :, 2:7] == 0) and np.all(two[:, :, :2] == 1) and np.all(two[:, :, 7:] == 2)
    # growth is 6-connected: a corner voxel two steps away diagonally stays
    single = np.ones((1, 3, 3), dtype=np.int64)
    single[0, 0, 0] = 0
    np.testing.assert_array_equal(mask_boundaries(single, 0, background_width=1)[0], [[0, 0, 1], [0, 1, 1], [1, 1, 1]])
    assert labels[0, 0, 3] == 1  # input untouched


def test_dataset_background_width_thickens_the_target_wall() -> None:
    raw = np.zeros((4, 16, 16), dtype=np.uint8)
    labels = np.ones((4, 16, 16), dtype=np.uint32)
    labels[:, :, 8] = 0
    labels[:, :, 9:] = 2
    volume = Volume(raw=raw, labels=labels, path=Path("mem.hdf"), padding=(0, 0, 0))
    sample = TrainDataset([volume], (4, 16, 16), background_width=1)[0]["labels"].numpy()
    assert np.all(sample[:, :, 7:10] == 0) and np.all(sample[:, :, :7] != 0) and np.all(sample[:, :, 10:] != 0)
    assert len(np.unique(sample)) == 3


def test_dataset_boundary_width_leaves_a_gap_between_objects() -> None:
    raw = np.zeros((4, 16, 16), dtype=np.uint8)
    labels = np.ones((4, 16, 16), dtype=np.uint32)
    labels[:, :, 8:] = 2
    volume = Volume(raw=raw, labels=labels, path=Path("mem.hdf"), padding=(0, 0, 0))
    sample = TrainDataset([volume], (4, 16, 16), boundary_width=1)[0]["labels"].numpy()
    assert np.all(sample[:, :, 7:9] == 0) and len(np.unique(sample)) == 3
