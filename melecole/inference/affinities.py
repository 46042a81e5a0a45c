"""Embeddings -> affinities (Lee et al. 2019) and affinity helpers.

Affinity channel ``c`` at voxel ``p`` concerns the pair ``(p, p + offsets[c])`` (docs/ARCHITECTURE.md):

    d = ||e_p - e_{p+o}||   (l1 or l2, the norm of the metric loss, LOSS.NORM)
    a = max(0, 1 - d / (2 * delta_d))^2      in [0, 1], 1 = same object

Pairs whose second voxel ``p + o`` lies outside the volume are invalid: they get the value
``INVALID_AFFINITY`` (0.0) and are never used as edges (see :func:`offset_valid_mask`; the mutex
watershed ignores them whatever their value).
"""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch

from melecole.utils.offsets import Offsets, check_offsets, offset_slices, offset_valid_mask

__all__ = [
    "INVALID_AFFINITY",
    "embeddings_to_affinities",
    "offset_valid_mask",
    "offset_slices",
    "affinities_from_labels",
]

# Value stored for pairs that leave the volume (or, after blending, that no window could compute).
INVALID_AFFINITY = 0.0

Norm = Literal["l1", "l2"]
ArrayLike = Union[np.ndarray, torch.Tensor]


def _pair_affinity_into(
    out: torch.Tensor, first: torch.Tensor, second: torch.Tensor, delta_d: float, norm: Norm
) -> None:
    """Writes the affinities of element-wise pairs of (E, ...) embedding views into ``out`` (...).

    One embedding channel at a time, accumulated in place in ``out``: the only temporary is one
    (...) difference, several times faster on CPU than reducing an (E, ...) difference.
    """
    out.zero_()
    # One reused buffer: fresh temporaries per channel fragment the CPU heap (RSS grows ~1x out).
    difference = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    for channel in range(first.shape[0]):
        torch.sub(first[channel], second[channel], out=difference)
        out.add_(difference.square_() if norm == "l2" else difference.abs_())
    if norm == "l2":
        out.sqrt_()
    out.mul_(-1.0 / (2.0 * delta_d)).add_(1.0).clamp_(min=0.0).square_()


def affinities_tensor(
    embedding: torch.Tensor, offsets: list[tuple[int, ...]], delta_d: float, norm: Norm
) -> torch.Tensor:
    """(E, Z, Y, X) -> (C, Z, Y, X) or (B, E, Z, Y, X) -> (B, C, Z, Y, X), float32 on the same device.

    The tensor core of :func:`embeddings_to_affinities` for callers that hold checked offsets (e.g.
    a batch of window embeddings in :mod:`melecole.inference.sliding_window`); no grad is recorded
    only if the caller disables it."""
    batched = embedding.ndim == 5
    if batched:  # E first so that channel indexing selects whole (B, Z, Y, X) blocks
        embedding = embedding.transpose(0, 1)
    dims, *leading_and_shape = embedding.shape
    shape = leading_and_shape[-3:]
    lead = (slice(None),) * (len(leading_and_shape) - 3)
    out_shape = (leading_and_shape[0], len(offsets), *shape) if batched else (len(offsets), *shape)
    out = torch.full(out_shape, INVALID_AFFINITY, dtype=torch.float32, device=embedding.device)
    for channel, offset in enumerate(offsets):
        slices = offset_slices(shape, offset)
        if slices is None:
            continue
        source, target = slices
        first = embedding[(slice(None),) + lead + source]
        second = embedding[(slice(None),) + lead + target]
        _pair_affinity_into(out[lead + (channel,) + source], first, second, delta_d, norm)
    return out


def embeddings_to_affinities(embedding: ArrayLike, offsets: Offsets, delta_d: float, norm: Norm = "l2") -> ArrayLike:
    """Affinities from embeddings: ``a = max(0, 1 - ||e_p - e_{p+o}|| / (2 delta_d))^2``.

    Args:
        embedding: (E, Z, Y, X) or batched (B, E, Z, Y, X); numpy array or torch tensor (any
            float dtype, any device; computed in float32 on that device).
        offsets: C offsets (dz, dy, dx); channel c concerns the pair (p, p + offsets[c]).
        delta_d: LOSS.DELTA_D; pairs further apart than 2 * delta_d get affinity 0.
        norm: "l2" or "l1", the norm of the metric loss (LOSS.NORM).

    Returns:
        float32 (C, Z, Y, X) (or (B, C, Z, Y, X)), same kind (numpy / torch) and device as the
        input; invalid pairs (p + o outside) hold ``INVALID_AFFINITY``.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not delta_d > 0:
        raise ValueError(f"delta_d must be > 0, got {delta_d}")
    is_numpy = isinstance(embedding, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(embedding)) if is_numpy else embedding
    if tensor.ndim not in (4, 5):
        raise ValueError(f"embedding must be (E, Z, Y, X) or (B, E, Z, Y, X), got shape {tuple(tensor.shape)}")
    checked = check_offsets(offsets, 3)
    with torch.no_grad():
        result = affinities_tensor(tensor, checked, float(delta_d), norm)
    return result.numpy() if is_numpy else result


def affinities_from_labels(labels: np.ndarray, offsets: Offsets, ignore_background: bool = False) -> np.ndarray:
    """Ideal affinities from a label volume (tests, benchmarks).

    Args:
        labels: (Z, Y, X) integer ids.
        offsets: C offsets (dz, dy, dx).
        ignore_background: if True, pairs touching label 0 get 0 (different objects); otherwise
            label 0 is an ordinary id.

    Returns:
        float32 (C, Z, Y, X): 1 where both voxels carry the same id, 0 otherwise and for invalid pairs.
    """
    labels = np.asarray(labels)
    checked = check_offsets(offsets, labels.ndim)
    out = np.full((len(checked),) + labels.shape, INVALID_AFFINITY, dtype=np.float32)
    for channel, offset in enumerate(checked):
        slices = offset_slices(labels.shape, offset)
        if slices is None:
            continue
        source, target = slices
        same = labels[source] == labels[target]
        if ignore_background:
            same &= labels[source] != 0
        out[(channel,) + source] = same
    return out
