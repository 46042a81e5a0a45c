"""Mutex watershed wrapper: weight convention, exact toy segmentations, masks, ignored edges, strides."""

from __future__ import annotations

import numpy as np
import pytest

from melecole.config import get_default_cfg
from melecole.inference.affinities import affinities_from_labels
from melecole.segmentation.mws import foreground_weighted, mutex_watershed, mws_weights
from melecole.utils.offsets import number_of_attractive_channels, offset_valid_mask

OFFSETS = [list(offset) for offset in get_default_cfg().INFERENCE.OFFSETS]  # the 12 default offsets


def _boxes() -> np.ndarray:
    """Three boxes tiling a (6, 16, 16) volume."""
    labels = np.zeros((6, 16, 16), dtype=np.uint32)
    labels[:, :8, :9] = 1
    labels[:, :8, 9:] = 2
    labels[:, 8:, :] = 3
    return labels


def _same_partition(first: np.ndarray, second: np.ndarray) -> bool:
    """Equal up to relabelling: the pairs (first, second) form a bijection."""
    pairs = np.unique(np.stack([first.ravel(), second.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_attractive_channels_are_the_leading_nearest_neighbours() -> None:
    assert number_of_attractive_channels(OFFSETS) == 3
    with pytest.raises(ValueError, match="nearest-neighbour"):
        number_of_attractive_channels([[-2, 0, 0], [-1, 0, 0]])
    with pytest.raises(ValueError, match="nearest-neighbour"):
        number_of_attractive_channels([[-1, 0, 0], [0, -5, 0], [0, 0, -1]])


def test_weight_convention_higher_first_for_both_kinds() -> None:
    """A line of 4 voxels, attractive a = 0.9 between neighbours, one mutex pair (0, 3).

    Mutex weight 1 - a: a = 0.05 (weight 0.95 > 0.9) blocks the last merge; a = 0.5 (weight 0.5)
    comes after all merges and changes nothing.
    """
    offsets = [[0, 0, -1], [0, 0, -3]]
    affinities = np.zeros((2, 1, 1, 4), dtype=np.float32)
    affinities[0, 0, 0, 1:] = 0.9
    affinities[1, 0, 0, 3] = 0.05
    labels = mutex_watershed(affinities, offsets).ravel()
    assert labels[0] != labels[3] and len(np.unique(labels)) == 2
    affinities[1, 0, 0, 3] = 0.5
    assert len(np.unique(mutex_watershed(affinities, offsets))) == 1
    # A weak attractive edge (0.3 < mutex weight 0.5) is processed after the mutex: split there.
    affinities[0, 0, 0, 2] = 0.3
    labels = mutex_watershed(affinities, offsets).ravel()
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_ideal_affinities_recover_the_boxes_exactly() -> None:
    labels = _boxes()
    segmentation = mutex_watershed(affinities_from_labels(labels, OFFSETS), OFFSETS)
    assert segmentation.dtype == np.uint64 and segmentation.shape == labels.shape
    assert _same_partition(segmentation, labels)
    assert len(np.unique(segmentation)) == 3 and segmentation.min() == 1


def test_noisy_affinities_still_recover_the_boxes() -> None:
    labels = _boxes()
    rng = np.random.default_rng(0)
    affinities = affinities_from_labels(labels, OFFSETS)
    affinities = np.clip(affinities + rng.uniform(-0.3, 0.3, affinities.shape), 0, 1).astype(np.float32)
    assert _same_partition(mutex_watershed(affinities, OFFSETS), labels)


def test_edges_leaving_the_volume_are_ignored() -> None:
    labels = _boxes()
    affinities = affinities_from_labels(labels, OFFSETS)
    reference = mutex_watershed(affinities, OFFSETS)
    invalid = ~offset_valid_mask(labels.shape, OFFSETS)
    for fill in (0.0, 1.0):  # both extremes: strongest mutex or strongest attraction, were they edges
        affinities[invalid] = fill
        assert np.array_equal(mutex_watershed(affinities, OFFSETS), reference)
    rng = np.random.default_rng(1)
    affinities[invalid] = rng.random(int(invalid.sum()))
    assert np.array_equal(mutex_watershed(affinities, OFFSETS), reference)


def test_background_mask_gives_zeros() -> None:
    labels = _boxes()
    labels[:, :, 4:6] = 0  # a boundary band
    foreground = (labels > 0).astype(np.float32) * 0.9 + 0.05
    segmentation = mutex_watershed(
        affinities_from_labels(labels, OFFSETS), OFFSETS, foreground=foreground, background_threshold=0.5
    )
    assert np.all(segmentation[labels == 0] == 0)
    assert np.all(segmentation[labels > 0] > 0)
    # The band cuts box 1 and box 3 in two: 5 objects, each one id.
    assert _same_partition(segmentation[labels > 0], _components(labels)[labels > 0])
    # Threshold 0 masks nothing: the band becomes objects too.
    unmasked = mutex_watershed(
        affinities_from_labels(labels, OFFSETS), OFFSETS, foreground=foreground, background_threshold=0.0
    )
    assert np.all(unmasked > 0)


def test_float16_foreground_is_masked_as_its_float32_values() -> None:
    from melecole.segmentation.fragments import watershed_fragments

    labels = _boxes()
    affinities = affinities_from_labels(labels, OFFSETS)
    # 0.98 rounds to 0.97998 in float16: a voxel stored so is below the threshold 0.98.
    stored = np.full(labels.shape, np.float16(0.98), dtype=np.float16)
    assert float(stored[0, 0, 0]) < 0.98
    stored[:, :, :5] = np.float16(0.99)
    for segment in (
        lambda fg: mutex_watershed(affinities, OFFSETS, foreground=fg, background_threshold=0.98),
        lambda fg: watershed_fragments(affinities, OFFSETS, fg, 0.98),
    ):
        from_stored, from_float32 = segment(stored), segment(stored.astype(np.float32))
        np.testing.assert_array_equal(from_stored, from_float32)
        assert np.all(from_stored[:, :, 5:] == 0) and np.all(from_stored[:, :, :5] > 0)


def _components(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    out = np.zeros(labels.shape, dtype=np.int64)
    next_id = 1
    for value in np.unique(labels[labels > 0]):
        pieces, count = ndimage.label(labels == value)
        out[pieces > 0] = pieces[pieces > 0] + next_id - 1
        next_id += count
    return out


@pytest.mark.parametrize("randomized", [False, True])
def test_strides_run_and_keep_ideal_results(randomized: bool) -> None:
    labels = _boxes()
    segmentation = mutex_watershed(
        affinities_from_labels(labels, OFFSETS), OFFSETS, strides=[1, 2, 2], randomized=randomized
    )
    assert segmentation.shape == labels.shape
    assert _same_partition(segmentation, labels)


def test_weights_in_place_and_precomputed_and_float16_agree() -> None:
    labels = _boxes()
    rng = np.random.default_rng(2)
    affinities = np.clip(affinities_from_labels(labels, OFFSETS) + rng.normal(0, 0.2, (12,) + labels.shape), 0, 1)
    affinities = affinities.astype(np.float16).astype(np.float32)
    reference = mutex_watershed(affinities, OFFSETS)
    weights = mws_weights(affinities, 3)
    assert weights is not affinities
    np.testing.assert_array_equal(weights[:3], affinities[:3])
    np.testing.assert_allclose(weights[3:], 1 - affinities[3:])
    assert np.array_equal(mutex_watershed(weights, OFFSETS, weights_ready=True), reference)
    assert np.array_equal(mutex_watershed(affinities.astype(np.float16), OFFSETS), reference)
    copy = affinities.copy()
    assert np.array_equal(mutex_watershed(copy, OFFSETS, in_place=True), reference)
    np.testing.assert_allclose(copy[3:], 1 - affinities[3:])  # documented: overwritten


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="len\\(offsets\\)"):
        mutex_watershed(np.zeros((2, 2, 2, 2), np.float32), OFFSETS)
    with pytest.raises(ValueError, match="foreground shape"):
        mutex_watershed(np.zeros((12, 2, 2, 2), np.float32), OFFSETS, foreground=np.zeros((2, 2)))


def test_foreground_power_scales_each_attractive_edge_by_its_weaker_end() -> None:
    rng = np.random.default_rng(0)
    shape = (4, 7, 9)
    affinities = rng.random((len(OFFSETS), *shape)).astype(np.float32)
    foreground = rng.uniform(0.3, 1.0, shape).astype(np.float16)  # a stored map: scaled as its float32 values
    num_attractive = number_of_attractive_channels(OFFSETS)
    weights = mws_weights(affinities, num_attractive)
    scaled = foreground_weighted(weights.copy(), foreground, OFFSETS, 2.5)
    values = foreground.astype(np.float64)
    for channel, offset in enumerate(OFFSETS):
        for p in np.ndindex(shape):
            q = tuple(a + b for a, b in zip(p, offset))
            inside = all(0 <= v < size for v, size in zip(q, shape))
            factor = min(values[p], values[q]) ** 2.5 if channel < num_attractive and inside else 1.0
            assert scaled[(channel, *p)] == pytest.approx(weights[(channel, *p)] * factor, rel=1e-5)
    assert foreground_weighted(weights, foreground, OFFSETS, 0) is weights
    with pytest.raises(ValueError, match="foreground power -1"):
        foreground_weighted(weights, foreground, OFFSETS, -1)


def _leaky_interface() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two boxes (x < 8, x >= 8) whose interface leaks: attractive 0.95 across it, mutex edges across it
    only 0.7 strong; the foreground head is unsure (0.6) on the two interface columns, sure (1) elsewhere."""
    labels = np.ones((4, 12, 16), dtype=np.uint32)
    labels[..., 8:] = 2
    affinities = affinities_from_labels(labels, OFFSETS)
    num_attractive = number_of_attractive_channels(OFFSETS)
    x_channel = next(c for c, o in enumerate(OFFSETS[:num_attractive]) if list(o) == [0, 0, -1])
    affinities[x_channel][..., 8] = 0.95  # the pair (x = 8, x = 7)
    across = affinities[num_attractive:] == 0
    affinities[num_attractive:][across] = 0.3
    foreground = np.ones(labels.shape, dtype=np.float32)
    foreground[..., 7:9] = 0.6
    return labels, affinities, foreground


def test_foreground_power_delays_a_merge_through_an_unsure_wall() -> None:
    labels, affinities, foreground = _leaky_interface()
    plain = mutex_watershed(affinities, OFFSETS, foreground=foreground, background_threshold=0.5)
    assert len(np.unique(plain)) == 1  # the leak (0.95) is drawn before the mutex edges (0.7)
    weighted = mutex_watershed(
        affinities, OFFSETS, foreground=foreground, background_threshold=0.5, foreground_power=3
    )
    assert _same_partition(weighted, labels)
    # Without a foreground map there is nothing to weight by: the plain result.
    np.testing.assert_array_equal(mutex_watershed(affinities, OFFSETS, foreground_power=3),
                                  mutex_watershed(affinities, OFFSETS))


def test_foreground_power_leaves_the_callers_weights_untouched() -> None:
    labels, affinities, foreground = _leaky_interface()
    weights = mws_weights(affinities, number_of_attractive_channels(OFFSETS))
    before = weights.copy()
    ready = mutex_watershed(weights, OFFSETS, foreground=foreground, background_threshold=0.5, weights_ready=True,
                            foreground_power=3)
    np.testing.assert_array_equal(weights, before)
    np.testing.assert_array_equal(ready, mutex_watershed(affinities, OFFSETS, foreground=foreground,
                                                         background_threshold=0.5, foreground_power=3))
