"""Mutex watershed (Wolf et al.) on blended affinities, numpy in, numpy out.

Weights follow docs/ARCHITECTURE.md: the nearest-neighbour channels (offsets with L1 norm 1, which must come
first) are attractive edges with weight ``a``; every other channel is a mutex (repulsive) edge with
weight ``1 - a``. The engine (``bioimage_cpp.segmentation.mutex_watershed``) processes edges of
both kinds in one list, highest weight first. Pairs that leave the volume are never edges (the
engine only builds edges inside the grid), so the values stored for them do not matter.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from melecole.utils.offsets import Offsets, number_of_attractive_channels, offset_slices

__all__ = [
    "foreground_mask", "foreground_weighted", "mutex_watershed", "mws_weights", "number_of_attractive_channels",
]


def mws_weights(affinities: np.ndarray, num_attractive: int, in_place: bool = False) -> np.ndarray:
    """Edge weights for the engine: ``a`` on attractive channels, ``1 - a`` on mutex channels.

    Args:
        affinities: (C, Z, Y, X) in [0, 1], float32 / float64 / float16 (float16 is widened).
        num_attractive: the first this many channels are attractive.
        in_place: overwrite ``affinities`` (C-contiguous float32 or float64 only) instead of
            allocating a copy; saves one affinity-sized array.

    Returns:
        C-contiguous float32 or float64 (C, Z, Y, X); ``affinities`` itself when ``in_place``.
    """
    if in_place:
        if affinities.dtype not in (np.float32, np.float64) or not affinities.flags.c_contiguous:
            raise ValueError("in_place needs a C-contiguous float32 or float64 affinity array")
        weights = affinities
    else:
        dtype = affinities.dtype if affinities.dtype in (np.float32, np.float64) else np.float32
        weights = np.empty(affinities.shape, dtype=dtype)
        weights[:num_attractive] = affinities[:num_attractive]
    # One channel at a time keeps the temporary of a dtype conversion channel-sized.
    for channel in range(num_attractive, affinities.shape[0]):
        np.subtract(1.0, affinities[channel], out=weights[channel], casting="unsafe")
    return weights


def foreground_mask(foreground: np.ndarray, background_threshold: float) -> np.ndarray:
    """``foreground >= background_threshold``, compared in at least float32.

    Stored foreground is float16, where a threshold such as 0.98 would itself round (to 0.97998) and
    let the voxels stored as 0.97998 through; every schedule (``infer.py``, blockwise, tuning) gets the
    mask of the float32 values, so the same stored map gives the same mask in each.
    """
    foreground = np.asarray(foreground)
    if foreground.dtype == np.float16:
        # The smallest float16 at or above the threshold: the float16 comparison then equals the float32
        # one, without a float32 copy of the volume.
        threshold = np.float16(background_threshold)
        if float(threshold) < background_threshold:
            threshold = np.nextafter(threshold, np.float16(np.inf))
        return foreground >= threshold
    return foreground >= background_threshold  # float32 / float64 / integers: numpy compares exactly


def foreground_weighted(
    weights: np.ndarray, foreground: np.ndarray, offsets: Offsets, power: float
) -> np.ndarray:
    """Scales the attractive weights in place: edge (p, p + o) times min(foreground[p], foreground[p + o]) ** power.

    INFERENCE.MWS_FOREGROUND_POWER: edges through voxels the foreground head is less sure of are drawn
    later, so a wall the head reads as thin (but above the background threshold) delays the merge across
    it instead of being crossed in the order of the embeddings' affinities alone. Mutex edges keep their
    weights. The foreground is compared in float32 (float16 maps are widened exactly), so every schedule
    scales the same stored map to the same weights. ``power`` 0 leaves ``weights`` as they are.

    Args:
        weights: (C, Z, Y, X) float32 / float64 engine weights (:func:`mws_weights`), changed in place.
        foreground: (Z, Y, X) foreground probability.
        offsets: C offsets, the nearest-neighbour (attractive) ones first.
        power: the exponent k >= 0.

    Returns:
        ``weights``.
    """
    if power == 0:
        return weights
    if power < 0:
        raise ValueError(f"foreground power {power}, expected >= 0")
    values = np.asarray(foreground, dtype=np.float32)
    exponent = weights.dtype.type(power)
    for channel in range(number_of_attractive_channels(offsets)):
        slices = offset_slices(values.shape, offsets[channel])
        if slices is not None:
            factor = np.minimum(values[slices[0]], values[slices[1]]).astype(weights.dtype, copy=False)
            weights[channel][slices[0]] *= factor**exponent
    return weights


def _engine_weights(
    affinities: np.ndarray, num_attractive: int, weights_ready: bool, in_place: bool
) -> tuple[np.ndarray, bool]:
    """(float32 / float64 engine weights, whether they are the caller's array: what is changed in it must be
    put back)."""
    if not weights_ready:
        return mws_weights(affinities, num_attractive, in_place=in_place), False
    if affinities.dtype not in (np.float32, np.float64):
        return affinities.astype(np.float32), False
    return affinities, True


def mutex_watershed(
    affinities: np.ndarray,
    offsets: Offsets,
    foreground: np.ndarray | None = None,
    background_threshold: float = 0.5,
    strides: Sequence[int] | None = None,
    randomized: bool = False,
    *,
    weights_ready: bool = False,
    in_place: bool = False,
    foreground_power: float = 0.0,
) -> np.ndarray:
    """Segments affinities with the mutex watershed.

    Args:
        affinities: (C, Z, Y, X) P(same object) in [0, 1] for the pairs (p, p + offsets[c]);
            float32 / float64 / float16. Invalid pairs (leaving the volume) are ignored.
        offsets: C offsets (dz, dy, dx); the nearest-neighbour ones first (attractive).
        foreground: optional (Z, Y, X) foreground probability; voxels below
            ``background_threshold`` are label 0 and none of their edges is used.
        background_threshold: INFERENCE.MWS_BACKGROUND. Ignored without ``foreground``.
        strides: optional (sz, sy, sx) sub-sampling of mutex edges (INFERENCE.MWS_STRIDES);
            None or all ones keeps every edge.
        randomized: sub-sample mutex edges at random with probability 1 / prod(strides) instead
            of on a regular grid (INFERENCE.MWS_RANDOMIZED_STRIDES).
        weights_ready: ``affinities`` already holds engine weights (from :func:`mws_weights`), so
            several thresholds can share one conversion.
        in_place: convert ``affinities`` to weights in place (it is overwritten).
        foreground_power: k > 0 scales the attractive weights by the foreground of both ends to the k
            (:func:`foreground_weighted`, INFERENCE.MWS_FOREGROUND_POWER). With ``weights_ready`` the
            caller's weights are scaled in place for the engine and their attractive channels put back
            afterwards (a copy of those channels only). Ignored without ``foreground``.

    Returns:
        uint64 (Z, Y, X) labels, consecutive from 1; 0 = background (masked) voxels.
    """
    from bioimage_cpp.segmentation import mutex_watershed as engine

    affinities = np.asarray(affinities)
    if affinities.ndim != 4 or affinities.shape[0] != len(offsets):
        raise ValueError(
            f"affinities must be (C, Z, Y, X) with C = len(offsets) = {len(offsets)}, got shape {affinities.shape}"
        )
    num_attractive = number_of_attractive_channels(offsets)
    weights, borrowed = _engine_weights(affinities, num_attractive, weights_ready, in_place)

    mask = None
    if foreground is not None:
        foreground = np.asarray(foreground)
        if foreground.shape != affinities.shape[1:]:
            raise ValueError(f"foreground shape {foreground.shape} must equal the affinities' {affinities.shape[1:]}")
        mask = foreground_mask(foreground, background_threshold)
        if mask.all():
            mask = None  # nothing masked: skip the engine's per-channel mask pass
    weighted = bool(foreground_power) and foreground is not None
    # Only the attractive channels change: keep the caller's (3 of 12 channels) instead of copying all.
    saved = weights[:num_attractive].copy() if weighted and borrowed else None
    # All-ones strides keep every edge; passing None skips the engine's stride pass.
    stride_list = [int(s) for s in strides] if strides is not None and any(int(s) != 1 for s in strides) else None
    try:
        if weighted:
            foreground_weighted(weights, foreground, offsets, foreground_power)
        labels = engine(
            weights,
            [[int(v) for v in offset] for offset in offsets],
            num_attractive,
            strides=stride_list,
            randomized_strides=bool(randomized and stride_list is not None),
            mask=mask,
        )
    finally:
        if saved is not None:
            weights[:num_attractive] = saved  # the agglomeration reads the caller's weights afterwards
    return labels.astype(np.uint64, copy=False)
