"""EM augmentations: value-level checks that labels follow raw exactly and intensities stay in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from melecole.config import get_default_cfg
from melecole.data.augment import (
    Compose,
    CutBlur,
    Elastic,
    Flip,
    Grayscale,
    Misalignment,
    MissingParts,
    MissingSection,
    MotionBlur,
    Noise,
    Rotate,
    build_augmentor,
)
from melecole.errors import ConfigError

SHAPE = (4, 12, 12)


def coordinate_labels(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Every voxel its own id: 1 + its linear index (so the source of a moved voxel is known)."""
    return np.arange(1, int(np.prod(shape)) + 1, dtype=np.uint64).reshape(shape)


def raw_of(labels: np.ndarray) -> np.ndarray:
    """Raw as a deterministic function of the label id, in (0, 1]."""
    return ((labels % 251).astype(np.float32) + 1.0) / 252.0


def random_raw(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return (0.2 + 0.6 * np.random.default_rng(seed).random(shape)).astype(np.float32)


ALL = [
    Flip(p=1.0),
    Rotate(p=1.0),
    Elastic(p=1.0, alpha=3.0, sigma=3.0),
    Grayscale(p=1.0),
    MissingSection(p=1.0),
    MissingParts(p=1.0),
    Misalignment(p=1.0, displacement=3),
    MotionBlur(p=1.0, kernel_size=5),
    CutBlur(p=1.0),
    Noise(p=1.0),
]


@pytest.mark.parametrize("augmentation", ALL, ids=lambda a: type(a).__name__)
def test_same_seed_same_output_and_input_untouched(augmentation) -> None:
    labels = coordinate_labels()
    raw = raw_of(labels)
    raw_before, labels_before = raw.copy(), labels.copy()
    first = augmentation(raw, labels, np.random.default_rng(7))
    second = augmentation(raw, labels, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(raw, raw_before)
    np.testing.assert_array_equal(labels, labels_before)
    assert first[0].shape == SHAPE and first[1].shape == SHAPE
    assert first[0].min() >= 0.0 and first[0].max() <= 1.0
    assert not np.array_equal(first[0], raw) or isinstance(augmentation, (Flip, Rotate))


@pytest.mark.parametrize("augmentation", ALL, ids=lambda a: type(a).__name__)
def test_probability_zero_is_identity(augmentation) -> None:
    augmentation = type(augmentation)(p=0.0)
    raw, labels = random_raw(), coordinate_labels()
    out_raw, out_labels = augmentation(raw, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(out_raw, raw)
    np.testing.assert_array_equal(out_labels, labels)


@pytest.mark.parametrize("augmentation", ALL, ids=lambda a: type(a).__name__)
def test_without_labels(augmentation) -> None:
    raw, labels = augmentation(random_raw(), None, np.random.default_rng(3))
    assert labels is None and raw.shape == SHAPE


def test_flip_twice_is_identity() -> None:
    flip = Flip(p=1.0, transpose=False)
    raw, labels = random_raw(), coordinate_labels()
    for seed in range(8):
        once = flip(raw, labels, np.random.default_rng(seed))
        twice = flip(*once, np.random.default_rng(seed))
        np.testing.assert_array_equal(twice[0], raw)
        np.testing.assert_array_equal(twice[1], labels)


def test_flip_and_rotate_move_labels_with_raw() -> None:
    labels = coordinate_labels()
    raw = raw_of(labels)
    seen = set()
    for seed in range(16):
        rng = np.random.default_rng(seed)
        out_raw, out_labels = Rotate(p=1.0)(*Flip(p=1.0)(raw, labels, rng), rng)
        np.testing.assert_array_equal(out_raw, raw_of(out_labels))
        assert sorted(out_labels.ravel()) == sorted(labels.ravel())  # a permutation of voxels
        seen.add(out_labels.tobytes())
    assert len(seen) > 4


def test_rotate_is_rot90() -> None:
    raw, labels = random_raw(), coordinate_labels()
    out_raw, out_labels = Rotate(p=1.0)(raw, labels, np.random.default_rng(1))
    k = next(k for k in (1, 2, 3) if np.array_equal(out_labels, np.rot90(labels, k, axes=(1, 2))))
    np.testing.assert_array_equal(out_raw, np.rot90(raw, k, axes=(1, 2)))


def test_rotate_and_flip_keep_non_square_shape() -> None:
    shape = (2, 6, 10)
    labels = coordinate_labels(shape)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out_raw, out_labels = Rotate(p=1.0)(*Flip(p=1.0)(raw_of(labels), labels, rng), rng)
        assert out_raw.shape == shape and out_labels.shape == shape


def test_elastic_labels_follow_raw_with_the_same_field() -> None:
    depth, height, width = SHAPE
    labels = coordinate_labels()
    slope_y, slope_x = 0.5 / height, 0.4 / width
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    raw = (0.05 + slope_y * y + slope_x * x).astype(np.float32)  # linear: exact under bilinear warping
    alpha = 3.0
    out_raw, out_labels = Elastic(p=1.0, alpha=alpha, sigma=3.0)(raw, labels, np.random.default_rng(5))
    valid = out_labels != 0
    assert valid.mean() > 0.5
    source = out_labels[valid].astype(np.int64) - 1
    source_z, source_y, source_x = np.unravel_index(source, SHAPE)
    np.testing.assert_array_equal(source_z, z[valid])  # in-plane only
    assert np.abs(source_y - y[valid]).max() <= alpha + 0.5
    assert np.abs(source_x - x[valid]).max() <= alpha + 0.5
    assert (source_y != y[valid]).any()
    expected = 0.05 + slope_y * source_y + slope_x * source_x  # raw at the nearest source voxel
    assert np.abs(out_raw[valid] - expected).max() <= 0.5 * (slope_y + slope_x) + 1e-6
    # one field for all sections
    np.testing.assert_array_equal(out_labels[1] != 0, out_labels[0] != 0)


def test_grayscale_keeps_range_and_labels() -> None:
    raw, labels = random_raw(), coordinate_labels()
    for mode in ("2d", "3d"):
        augmentation = Grayscale(p=1.0, contrast=0.9, brightness=0.5, gamma=1.0, mode=mode)
        for seed in range(5):
            out_raw, out_labels = augmentation(raw, labels, np.random.default_rng(seed))
            assert out_raw.dtype == np.float32 and 0.0 <= out_raw.min() and out_raw.max() <= 1.0
            assert out_labels is labels
            assert not np.allclose(out_raw, raw)


def test_grayscale_3d_is_monotonic_for_the_whole_patch() -> None:
    raw = random_raw()
    out, _ = Grayscale(p=1.0, brightness=0.0, mode="3d")(raw, None, np.random.default_rng(2))
    order = np.argsort(raw.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6)  # one monotonic map for every section


def test_missing_section_blanks_exactly_the_chosen_sections() -> None:
    raw, labels = random_raw(shape=(6, 8, 8)), coordinate_labels((6, 8, 8))
    counts = set()
    for seed in range(10):
        out_raw, out_labels = MissingSection(p=1.0, num_sections=3, mode="blank")(
            raw, labels, np.random.default_rng(seed)
        )
        blank = [z for z in range(6) if np.all(out_raw[z] == 0)]
        counts.add(len(blank))
        assert 1 <= len(blank) <= 3
        kept = [z for z in range(6) if z not in blank]
        np.testing.assert_array_equal(out_raw[kept], raw[kept])
        assert out_labels is labels
    assert len(counts) > 1


def test_missing_section_copy_uses_a_neighbour() -> None:
    raw = random_raw(shape=(5, 6, 6))
    out, _ = MissingSection(p=1.0, num_sections=1, mode="copy")(raw, None, np.random.default_rng(4))
    changed = [z for z in range(5) if not np.array_equal(out[z], raw[z])]
    assert len(changed) == 1
    z = changed[0]
    assert any(np.array_equal(out[z], raw[n]) for n in (z - 1, z + 1) if 0 <= n < 5)


def test_missing_parts_changes_one_box_in_one_section() -> None:
    raw, labels = random_raw(), coordinate_labels()
    for seed in range(6):
        out_raw, out_labels = MissingParts(p=1.0, size=0.5)(raw, labels, np.random.default_rng(seed))
        changed = out_raw != raw
        assert np.count_nonzero(changed.any(axis=(1, 2))) <= 1
        assert changed.sum(axis=(1, 2)).max() <= (6 * 6)  # box sides <= size * side
        assert out_labels is labels


@pytest.mark.parametrize("slip_ratio", [1.0, 0.0])
def test_misalignment_moves_labels_with_raw(slip_ratio: float) -> None:
    labels = coordinate_labels((5, 10, 10))
    raw = raw_of(labels)
    augmentation = Misalignment(p=1.0, displacement=3, slip_ratio=slip_ratio)
    for seed in range(6):
        out_raw, out_labels = augmentation(raw, labels, np.random.default_rng(seed))
        valid = out_labels != 0
        np.testing.assert_array_equal(out_raw[valid], raw_of(out_labels[valid]))
        moved = [z for z in range(5) if not np.array_equal(out_labels[z], labels[z])]
        if slip_ratio == 1.0:
            assert len(moved) <= 1
        elif moved:
            assert moved == list(range(moved[0], 5))  # every section from one index on
        for z in moved:  # a pure in-plane translation
            source = np.unravel_index(out_labels[z][valid[z]].astype(np.int64) - 1, (5, 10, 10))
            y, x = np.nonzero(valid[z])
            assert np.all(source[0] == z)
            assert len(set(source[1] - y)) == 1 and len(set(source[2] - x)) == 1


def test_motion_blur_changes_only_some_sections() -> None:
    raw = random_raw(shape=(6, 16, 16))
    out, _ = MotionBlur(p=1.0, sections=2, kernel_size=5, sigma=2.0)(raw, None, np.random.default_rng(0))
    changed = [z for z in range(6) if not np.allclose(out[z], raw[z])]
    assert 1 <= len(changed) <= 2
    for z in changed:
        assert out[z].std() < raw[z].std()  # blurred
        assert abs(out[z].mean() - raw[z].mean()) < 0.02


def test_cut_blur_changes_only_a_box() -> None:
    raw, labels = random_raw(shape=(3, 20, 20)), coordinate_labels((3, 20, 20))
    out_raw, out_labels = CutBlur(p=1.0, length_ratio=0.5, down_ratio=(3.0, 3.0))(
        raw, labels, np.random.default_rng(1)
    )
    changed = np.nonzero(out_raw != raw)
    assert len(changed[0]) > 0
    assert changed[1].max() - changed[1].min() < 10 and changed[2].max() - changed[2].min() < 10
    assert out_labels is labels


def test_noise_statistics() -> None:
    raw = np.full((4, 32, 32), 0.5, np.float32)
    out, _ = Noise(p=1.0, std=0.1)(raw, None, np.random.default_rng(0))
    assert 0.0 < out.std() <= 0.12 and abs(out.mean() - 0.5) < 0.01


def test_compose_crops_after_spatial_augmentations() -> None:
    compose = Compose(
        [Flip(p=1.0), Misalignment(p=1.0, displacement=2), Elastic(p=1.0, alpha=2.0), Noise(p=1.0)]
    )
    assert compose.margin == (0, 4, 4)
    labels = coordinate_labels((4, 16, 16))
    raw = raw_of(labels)
    out_raw, out_labels = compose(raw, labels, np.random.default_rng(0), crop_size=(4, 8, 8))
    assert out_raw.shape == (4, 8, 8) and out_labels.shape == (4, 8, 8)
    assert np.all(out_labels != 0)  # the margin absorbed everything that moved in from outside


def test_build_augmentor_follows_config() -> None:
    cfg = get_default_cfg()
    names = [type(t).__name__ for t in build_augmentor(cfg).transforms]
    assert names == [
        "Flip", "Rotate", "Elastic", "Misalignment", "MissingSection",
        "MissingParts", "MotionBlur", "CutBlur", "Grayscale", "Noise",
    ]  # fmt: skip
    cfg.AUGMENTATION.ELASTIC.ENABLED = False
    assert "Elastic" not in [type(t).__name__ for t in build_augmentor(cfg).transforms]
    cfg.AUGMENTATION.ENABLED = False
    assert len(build_augmentor(cfg)) == 0
    cfg.AUGMENTATION.ENABLED = True
    cfg.AUGMENTATION.NOISE.P = 1.5
    with pytest.raises(ConfigError, match=r"AUGMENTATION.NOISE: probability p must be in \[0, 1\]"):
        build_augmentor(cfg)


def test_full_default_pipeline_keeps_correspondence_for_exact_augmentations() -> None:
    cfg = get_default_cfg()
    cfg.AUGMENTATION.ELASTIC.ENABLED = False  # interpolates raw; checked separately
    compose = build_augmentor(cfg)
    labels = coordinate_labels((4, 40, 40))
    raw = raw_of(labels)
    compose.transforms = compose.transforms[:3]  # flip, rotate, misalignment
    for seed in range(4):
        out_raw, out_labels = compose(raw, labels, np.random.default_rng(seed), crop_size=(4, 16, 16))
        valid = out_labels != 0
        np.testing.assert_array_equal(out_raw[valid], raw_of(out_labels[valid]))
