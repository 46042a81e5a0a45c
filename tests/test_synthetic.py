"""The embedded synthetic dataset: determinism, label statistics, layout, and that it is not trivial."""

from __future__ import annotations

from pathlib import Path

import cc3d
import h5py
import numpy as np
import pytest

from melecole.cli.synthetic import main
from melecole.data.synthetic import (
    SMALL_SHAPE,
    generate_dataset,
    generate_volume,
    threshold_baseline,
)
from melecole.errors import DataError


@pytest.fixture(scope="module")
def small_volume() -> tuple[np.ndarray, np.ndarray, dict]:
    return generate_volume(SMALL_SHAPE, seed=0, return_info=True)


@pytest.fixture(scope="module")
def medium_volume() -> tuple[np.ndarray, np.ndarray]:
    return generate_volume((16, 96, 96), seed=1)


def test_dtypes_shapes_and_label_statistics(small_volume):
    raw, labels, info = small_volume
    assert raw.shape == labels.shape == SMALL_SHAPE
    assert raw.dtype == np.uint8 and labels.dtype == np.uint32
    boundary_fraction = float(np.mean(labels == 0))
    assert 0.03 < boundary_fraction < 0.25
    assert info["boundary_fraction"] == pytest.approx(boundary_fraction)
    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    assert info["n_objects"] == len(ids) == labels.max()  # ids are 1..N, no holes
    assert len(ids) >= 5
    # Dense packing of mostly large objects: no crumbs carry a notable share of the voxels.
    assert counts[counts >= 200].sum() / counts.sum() > 0.95
    assert raw.std() > 20  # real contrast, not a flat image


def test_each_id_is_one_connected_component(small_volume):
    _, labels, _ = small_volume
    components = cc3d.connected_components(labels, connectivity=6)
    assert components.max() == labels.max()


def test_deterministic_for_a_seed_and_different_across_seeds(small_volume):
    raw, labels, _ = small_volume
    raw_again, labels_again = generate_volume(SMALL_SHAPE, seed=0)
    np.testing.assert_array_equal(raw, raw_again)
    np.testing.assert_array_equal(labels, labels_again)
    raw_other, labels_other = generate_volume(SMALL_SHAPE, seed=1)
    assert np.mean(raw != raw_other) > 0.5
    assert np.mean(labels != labels_other) > 0.5


def test_membranes_are_dark_and_dark_organelles_are_not_boundaries(medium_volume):
    raw, labels = medium_volume
    membrane_mean = raw[labels == 0].mean()
    interior = raw[labels != 0]
    assert membrane_mean < interior.mean() - 40
    # Mitochondria, vesicles and dark neurites: dark voxels that are labelled as neurites.
    assert np.mean(interior < membrane_mean + 15) > 0.01


def test_sections_are_anisotropic(medium_volume):
    _, labels = medium_volume
    upper, lower = labels[:-1], labels[1:]
    both = (upper != 0) & (lower != 0)
    changed = np.mean(upper[both] != lower[both])
    # Objects shift between thick sections, yet stay traceable.
    assert 0.05 < changed < 0.4


def test_defects_are_logged_and_keep_labels_valid():
    raw, labels, info = generate_volume(SMALL_SHAPE, seed=2, defects=True, return_info=True)
    defects = info["defects"]
    assert set(defects) == {"missing", "low_contrast", "blurred", "misaligned", "step_shift"}
    assert len(defects["misaligned"]) >= 1
    for z in defects["missing"]:
        assert raw[z].mean() < 80 and raw[z].std() < 15
    assert cc3d.connected_components(labels, connectivity=6).max() == labels.max()
    clean_raw, _ = generate_volume(SMALL_SHAPE, seed=2)
    assert np.any(clean_raw != raw)


def test_invalid_arguments_fail_clearly():
    with pytest.raises(DataError, match="shape"):
        generate_volume((16, 64), seed=0)
    with pytest.raises(DataError, match="seed"):
        generate_volume(SMALL_SHAPE, seed=-1)


def test_baseline_scores_a_trivially_separable_volume_as_perfect():
    labels = np.zeros((4, 8, 8), dtype=np.uint32)
    labels[:, :, :3], labels[:, :, 4:] = 1, 2
    raw = np.where(labels > 0, 200, 20).astype(np.uint8)
    scores = threshold_baseline(raw, labels)
    assert scores["vi"] == pytest.approx(0.0, abs=1e-9)
    assert scores["arand"] == pytest.approx(0.0, abs=1e-9)


def test_naive_threshold_baseline_is_far_from_perfect(medium_volume):
    raw, labels = medium_volume
    scores = threshold_baseline(raw, labels)
    assert scores["arand"] > 0.4
    assert scores["vi"] > 1.5
    assert scores["vi_merge"] > scores["vi_split"]  # gaps and z shifts make it merge


def test_cli_writes_the_dataset_layout(tmp_path: Path):
    out = tmp_path / "synthetic"
    assert main(["--out", str(out), "--seed", "3", "--small"]) == 0
    files = {split: sorted((out / split).glob("*.hdf")) for split in ("train", "val", "test")}
    assert [len(files[split]) for split in ("train", "val", "test")] == [2, 1, 1]
    assert not list(out.rglob("*.tmp"))
    for paths in files.values():
        for path in paths:
            with h5py.File(path, "r") as handle:
                raw, labels = handle["volume"][:], handle["labels"][:]
                assert handle["volume"].compression == "gzip"
            assert raw.shape == labels.shape == SMALL_SHAPE
            assert raw.dtype == np.uint8 and labels.dtype == np.uint32
            assert 0 < np.mean(labels == 0) < 0.3
    # The library call with the same seed reproduces the CLI's files bit for bit.
    again = generate_dataset(tmp_path / "again", seed=3, shape=SMALL_SHAPE, splits={"val": 1})
    with h5py.File(files["val"][0], "r") as first, h5py.File(again[0], "r") as second:
        np.testing.assert_array_equal(first["volume"][:], second["volume"][:])
        np.testing.assert_array_equal(first["labels"][:], second["labels"][:])
