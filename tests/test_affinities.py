"""Embeddings -> affinities against a direct per-voxel computation; invalid pairs; label affinities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from melecole.inference.affinities import (
    INVALID_AFFINITY,
    affinities_from_labels,
    embeddings_to_affinities,
    offset_valid_mask,
)

OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -2, 1], [1, 0, -3], [0, 3, 3]]


def _direct(embedding: np.ndarray, offsets, delta_d: float, norm: str) -> np.ndarray:
    """Per-voxel loop: the formula exactly as docs/ARCHITECTURE.md states it."""
    shape = embedding.shape[1:]
    out = np.full((len(offsets),) + shape, np.nan)
    for channel, offset in enumerate(offsets):
        for p in itertools.product(*(range(s) for s in shape)):
            q = tuple(a + b for a, b in zip(p, offset))
            if all(0 <= v < s for v, s in zip(q, shape)):
                difference = embedding[(slice(None),) + p] - embedding[(slice(None),) + q]
                distance = np.sqrt((difference**2).sum()) if norm == "l2" else np.abs(difference).sum()
                out[(channel,) + p] = max(0.0, 1.0 - distance / (2 * delta_d)) ** 2
    return out


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_formula_matches_direct_computation(norm: str) -> None:
    rng = np.random.default_rng(0)
    embedding = rng.normal(scale=0.8, size=(3, 4, 5, 6)).astype(np.float32)
    expected = _direct(embedding.astype(np.float64), OFFSETS, 1.5, norm)
    result = embeddings_to_affinities(embedding, OFFSETS, delta_d=1.5, norm=norm)
    assert isinstance(result, np.ndarray) and result.dtype == np.float32
    assert result.shape == (len(OFFSETS), 4, 5, 6)
    valid = ~np.isnan(expected)
    np.testing.assert_allclose(result[valid], expected[valid], atol=1e-6)
    assert np.all(result[~valid] == INVALID_AFFINITY)
    assert np.array_equal(valid, offset_valid_mask((4, 5, 6), OFFSETS))
    # The range covers both regimes: some pairs beyond 2 delta_d (0) and some close (> 0.5).
    assert (result[valid] == 0).any() and (result[valid] > 0.5).any()


def test_torch_batched_path_agrees_with_single_volumes() -> None:
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(2, 4, 6, 7, 8)).astype(np.float32)
    per_item = np.stack([embeddings_to_affinities(e, OFFSETS, 1.0, "l2") for e in embedding])
    batched = embeddings_to_affinities(torch.from_numpy(embedding), OFFSETS, 1.0, "l2")
    assert isinstance(batched, torch.Tensor) and batched.shape == (2, len(OFFSETS), 6, 7, 8)
    assert batched.is_contiguous()
    np.testing.assert_allclose(batched.numpy(), per_item, atol=1e-6)
    # float64 / float16 inputs are computed in float32.
    as_double = embeddings_to_affinities(embedding[0].astype(np.float64), OFFSETS, 1.0, "l2")
    assert as_double.dtype == np.float32
    np.testing.assert_allclose(as_double, per_item[0], atol=1e-6)


def test_identical_embeddings_give_one_and_far_ones_zero() -> None:
    embedding = np.zeros((2, 3, 4, 4), dtype=np.float32)
    same = embeddings_to_affinities(embedding, OFFSETS[:3], delta_d=0.5)
    mask = offset_valid_mask((3, 4, 4), OFFSETS[:3])
    assert np.all(same[mask] == 1.0)
    embedding[:, :, :2] = 10.0  # two halves along y, far apart
    split = embeddings_to_affinities(embedding, [[0, -1, 0]], delta_d=0.5)
    assert np.all(split[0, :, 2] == 0.0) and np.all(split[0, :, 3] == 1.0)


def test_offsets_larger_than_the_volume_are_all_invalid() -> None:
    embedding = np.ones((2, 2, 3, 3), dtype=np.float32)
    result = embeddings_to_affinities(embedding, [[-5, 0, 0], [0, 0, -1]], delta_d=1.0)
    assert np.all(result[0] == INVALID_AFFINITY)
    assert not offset_valid_mask((2, 3, 3), [[-5, 0, 0]]).any()


def test_bad_arguments_raise() -> None:
    embedding = np.zeros((2, 3, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="norm"):
        embeddings_to_affinities(embedding, OFFSETS, 1.0, norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delta_d"):
        embeddings_to_affinities(embedding, OFFSETS, 0.0)
    with pytest.raises(ValueError, match="offsets"):
        embeddings_to_affinities(embedding, [[1, 0]], 1.0)


def test_affinities_from_labels() -> None:
    labels = np.array([[[1, 1, 2, 0, 0]]])
    result = affinities_from_labels(labels, [[0, 0, -1]])
    np.testing.assert_array_equal(result[0, 0, 0], [0, 1, 0, 0, 1])
    ignored = affinities_from_labels(labels, [[0, 0, -1]], ignore_background=True)
    np.testing.assert_array_equal(ignored[0, 0, 0], [0, 1, 0, 0, 0])
