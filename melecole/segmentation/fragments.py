"""Fragments of one block (numpy in, numpy out): voxel mutex watershed or a seeded watershed.

The algorithms are entries of :data:`FRAGMENT_ALGORITHMS` (a function, the channels it reads, its
automatic minimum size, its config keys); a new one is a function and one line there (plus its config
keys in ``melecole/config/defaults.py``). Every algorithm segments the block plus its halo, then the
result is cropped to the block, so the fragments near a block face saw context on both sides. Ids
inside a block are consecutive from 1 (0 = background); globally unique ids come from
:func:`global_fragment_ids` (block index x voxels per block, no coordination).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import fastremap
import numpy as np
from scipy import ndimage

from melecole.segmentation.mws import foreground_mask, mutex_watershed
from melecole.segmentation.postprocess import remove_small_segments
from melecole.utils.offsets import Offsets, number_of_attractive_channels, offset_slices

__all__ = [
    "FRAGMENT_ALGORITHMS",
    "FragmentAlgorithm",
    "fragment_algorithm",
    "drop_small_fragments",
    "block_fragments",
    "mws_fragments",
    "watershed_fragments",
    "boundary_height",
    "global_fragment_ids",
]



def _attractive_pairs(offsets: Offsets, shape: Sequence[int]) -> Iterator[tuple[int, tuple, tuple]]:
    """(channel, source, target) slices of every valid pair (p, p + o) of the nearest-neighbour
    channels (:func:`melecole.utils.offsets.offset_slices`)."""
    for channel in range(number_of_attractive_channels(offsets)):
        slices = offset_slices(shape, offsets[channel])
        if slices is not None:
            yield (channel, *slices)


def boundary_height(affinities: np.ndarray, offsets: Offsets, reduce: str = "mean") -> np.ndarray:
    """1 - mean (or min) nearest-neighbour affinity of each voxel to its (up to 6) neighbours.

    Args:
        affinities: (C, Z, Y, X) float in [0, 1]; the first channels are the nearest-neighbour ones.
        offsets: C offsets.
        reduce: mean | min (min: a voxel next to any boundary is high, so objects stay apart).

    Returns:
        float32 (Z, Y, X) in [0, 1]: high on boundaries.
    """
    shape = affinities.shape[1:]
    if reduce == "min":
        lowest = np.ones(shape, dtype=np.float32)
        for channel, source, target in _attractive_pairs(offsets, shape):
            values = affinities[channel][source]
            np.minimum(lowest[source], values, out=lowest[source])
            np.minimum(lowest[target], values, out=lowest[target])
        return np.subtract(1.0, lowest, out=lowest)
    total = np.zeros(shape, dtype=np.float32)
    count = np.zeros(shape, dtype=np.float32)
    for channel, source, target in _attractive_pairs(offsets, shape):
        # Pair (p, p + o): valid where p + o lies inside; the value counts for both voxels.
        values = affinities[channel][source]
        total[source] += values
        total[target] += values
        count[source] += 1.0
        count[target] += 1.0
    np.divide(total, np.maximum(count, 1.0), out=total)
    return np.subtract(1.0, total, out=total)


def mws_fragments(
    affinities: np.ndarray,
    offsets: Offsets,
    foreground: np.ndarray | None,
    background_threshold: float,
    strides: Sequence[int] | None = None,
    foreground_power: float = 0.0,
) -> np.ndarray:
    """Voxel mutex watershed of a (padded) block: uint64 (Z, Y, X), 0 = background."""
    return mutex_watershed(affinities, offsets, foreground, background_threshold, strides,
                           foreground_power=foreground_power)


def watershed_fragments(
    affinities: np.ndarray,
    offsets: Offsets,
    foreground: np.ndarray | None,
    background_threshold: float,
    interior_threshold: float = 0.5,
    seed_sigma: float = 1.0,
) -> np.ndarray:
    """Seeded watershed on the nearest-neighbour affinities (a fast over-segmentation).

    Seeds are the connected plateaus of local maxima of the (Gaussian-smoothed) city-block distance
    transform of the interior (voxels whose weakest nearest-neighbour affinity is above 1 - ``interior_threshold``).
    Each voxel joins the seed it reaches along the strongest-affinity path (bioimage-cpp
    ``watershed_from_affinities``); when the nearest-neighbour offsets do not have one sign per axis,
    the height map (1 - mean nearest-neighbour affinity) is flooded instead.

    Returns:
        uint64 (Z, Y, X), 0 = background (foreground below ``background_threshold``).
    """
    from bioimage_cpp.segmentation import watershed, watershed_from_affinities

    mask = None if foreground is None else foreground_mask(foreground, background_threshold)
    interior = boundary_height(affinities, offsets, reduce="min") < interior_threshold
    if mask is not None:
        interior &= mask
    # City-block (chamfer) distance: ~7x faster than the Euclidean transform on a padded block, and
    # after the smoothing below it gives the same fragments' quality (bench/RESULTS.md, blockwise).
    distance = ndimage.distance_transform_cdt(interior, metric="taxicab").astype(np.float32)
    if seed_sigma > 0:
        distance = ndimage.gaussian_filter(distance, seed_sigma)
    maxima = (distance == ndimage.maximum_filter(distance, size=3)) & interior
    seeds, _ = ndimage.label(maxima)
    seeds = seeds.astype(np.uint64)
    nearest = [[int(v) for v in o] for o in offsets[: number_of_attractive_channels(offsets)]]
    signs = {sum(o) for o in nearest}
    axes = sorted(next(a for a, v in enumerate(o) if v) for o in nearest)
    if len(signs) == 1 and axes == [0, 1, 2]:
        edges = np.ascontiguousarray(affinities[: len(nearest)], dtype=np.float32)
        labels = watershed_from_affinities(edges, nearest, seeds, mask=mask)
    else:
        labels = watershed(boundary_height(affinities, offsets), seeds, mask=mask)
    return labels.astype(np.uint64, copy=False)


def drop_small_fragments(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Sets fragments with fewer than ``min_size`` voxels to background 0, as ``infer.py`` drops voxel-MWS
    segments under INFERENCE.MIN_SEGMENT_SIZE (the relabel pass's background fill then gives their
    voxels the nearest segment's label). Fragments touching a face of the array are kept whatever their
    size (they may go on outside it). ``labels`` is not changed; it is returned as is when nothing is small.
    """
    if min_size <= 1 or labels.size == 0:
        return labels
    faces = [labels[(slice(None),) * axis + (end,)] for axis in range(labels.ndim) for end in (0, -1)]
    on_faces = np.concatenate([fastremap.unique(face) for face in faces])
    return remove_small_segments(labels, min_size, keep=on_faces)


@dataclass(frozen=True)
class FragmentAlgorithm:
    """An entry of :data:`FRAGMENT_ALGORITHMS`.

    Attributes:
        function: ``function(affinities, offsets, foreground, background_threshold, **params)`` -> uint64
            labels of the padded block (0 = background); ``affinities`` holds the channels it reads.
        channels: ``all`` or ``attractive`` (only the nearest-neighbour channels are read and decoded).
        auto_min_size: BLOCKWISE.MIN_FRAGMENT_SIZE -1 (auto) drops fragments under INFERENCE.MIN_SEGMENT_SIZE
            (voxel-MWS fragments, like ``infer.py``'s segments) instead of keeping all.
        config_keys: {keyword of ``function``: config key} (its settings; read once into the options).
        bytes_per_padded_voxel: peak memory of a worker per voxel of a padded block (block + 2 x halo,
            12 channels), the blockwise memory rule of thumb (measured: docs/blockwise.md).
    """

    function: Callable[..., np.ndarray]
    channels: Literal["all", "attractive"] = "all"
    auto_min_size: bool = False
    config_keys: Mapping[str, str] = field(default_factory=dict)
    bytes_per_padded_voxel: float = 600.0


# Name -> algorithm: BLOCKWISE.FRAGMENTS, --fragments and the config validation read this table.
FRAGMENT_ALGORITHMS: dict[str, FragmentAlgorithm] = {
    "mws": FragmentAlgorithm(
        mws_fragments, "all", True,
        {"strides": "INFERENCE.MWS_STRIDES", "foreground_power": "INFERENCE.MWS_FOREGROUND_POWER"}, 600.0,
    ),
    "watershed": FragmentAlgorithm(
        watershed_fragments, "attractive", False,
        {"interior_threshold": "BLOCKWISE.WATERSHED_THRESHOLD", "seed_sigma": "BLOCKWISE.SEED_SIGMA"}, 210.0,
    ),
}


def fragment_algorithm(name: str) -> FragmentAlgorithm:
    """The registered algorithm ``name``; ValueError listing the choices otherwise."""
    if name not in FRAGMENT_ALGORITHMS:
        raise ValueError(f"fragment algorithm '{name}', expected one of {', '.join(FRAGMENT_ALGORITHMS)}")
    return FRAGMENT_ALGORITHMS[name]


def block_fragments(
    affinities: np.ndarray,
    offsets: Offsets,
    inner: tuple[slice, ...],
    *,
    mode: str = "mws",
    foreground: np.ndarray | None = None,
    background_threshold: float = 0.5,
    params: Mapping[str, Any] | None = None,
    min_size: int = 0,
) -> np.ndarray:
    """Fragments of one block: segment the padded block, drop fragments under ``min_size`` voxels
    (:func:`drop_small_fragments`, sizes in the padded block), crop to ``inner``, renumber 1..n.

    Args:
        affinities: (C, Z, Y, X) float32 in [0, 1] of the block plus halo (at least the channels the
            algorithm reads).
        offsets: their offsets (nearest-neighbour first).
        inner: the block's slices inside the padded arrays.
        mode: a name of :data:`FRAGMENT_ALGORITHMS`.
        foreground: optional (Z, Y, X) foreground probability of the padded block.
        background_threshold: foreground below it is background.
        params: the algorithm's own keyword arguments (``SegmentationOptions.fragment_params``).

    Returns:
        uint64 (z, y, x) of the block: consecutive ids 1..n in order of first appearance, 0 = background.
    """
    algorithm = fragment_algorithm(mode)
    labels = algorithm.function(affinities, offsets, foreground, background_threshold, **dict(params or {}))
    labels = drop_small_fragments(labels, min_size)
    block = np.ascontiguousarray(labels[tuple(inner)])
    block, _ = fastremap.renumber(block, preserve_zero=True, in_place=True)
    return block.astype(np.uint64, copy=False)


def global_fragment_ids(local: np.ndarray, block_index: int, block_voxels: int) -> np.ndarray:
    """Block-local ids 1..n -> ids unique in the volume: ``local + block_index * block_voxels`` (0 stays 0).

    A block holds at most ``block_voxels`` fragments, so the ranges of two blocks never overlap.
    """
    local = np.asarray(local, dtype=np.uint64)
    base = np.uint64(block_index) * np.uint64(block_voxels)
    return np.where(local > 0, local + base, np.uint64(0))
