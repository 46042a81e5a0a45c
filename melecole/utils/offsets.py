"""Offsets (dz, dy, dx) of affinity channels: valid pairs on a grid, reach, attractive channels.

Numpy only: used by the losses, the affinities, the segmentation algorithms and the blockwise plan.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "Offsets",
    "check_offsets",
    "number_of_attractive_channels",
    "offset_reach",
    "offset_slices",
    "offset_valid_mask",
]

Offsets = Sequence[Sequence[int]]


def offset_slices(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices ``(source, target)`` selecting every valid pair ``(p, p + offset)`` of a grid.

    ``array[source]`` are the voxels p whose partner ``p + offset`` is inside, ``array[target]``
    the partners, element by element. None if no pair is valid (|offset| >= size on some axis).
    """
    source, target = [], []
    for size, step in zip(shape, offset):
        step = int(step)
        if abs(step) >= size:
            return None
        source.append(slice(max(0, -step), size - max(0, step)))
        target.append(slice(max(0, step), size - max(0, -step)))
    return tuple(source), tuple(target)


def offset_valid_mask(shape: Sequence[int], offsets: Offsets) -> np.ndarray:
    """bool (C, Z, Y, X): True where the pair ``(p, p + offsets[c])`` lies inside ``shape``."""
    shape = tuple(int(s) for s in shape)
    mask = np.zeros((len(offsets),) + shape, dtype=bool)
    for channel, offset in enumerate(offsets):
        slices = offset_slices(shape, offset)
        if slices is not None:
            mask[(channel,) + slices[0]] = True
    return mask


def check_offsets(offsets: Offsets, ndim: int) -> list[tuple[int, ...]]:
    """The offsets as int tuples; ValueError unless a non-empty list of ``ndim``-tuples."""
    checked = [tuple(int(v) for v in offset) for offset in offsets]
    if not checked or any(len(offset) != ndim for offset in checked):
        raise ValueError(f"offsets must be a non-empty list of {ndim}-tuples, got {list(offsets)!r}")
    return checked


def offset_reach(offsets: Offsets) -> tuple[int, int, int]:
    """Largest |offset| per axis (z, y, x): the context a voxel's affinities need."""
    return tuple(max(abs(int(o[axis])) for o in offsets) for axis in range(3))  # type: ignore[return-value]


def number_of_attractive_channels(offsets: Offsets) -> int:
    """How many leading offsets are nearest-neighbour (L1 norm 1) offsets: the attractive channels.

    Raises:
        ValueError: no leading nearest-neighbour offset, or one appears after a long-range offset.
    """
    norms = [sum(abs(int(v)) for v in offset) for offset in offsets]
    count = 0
    while count < len(norms) and norms[count] == 1:
        count += 1
    if count == 0 or 1 in norms[count:]:
        raise ValueError(
            f"offsets must start with the nearest-neighbour offsets (L1 norm 1, attractive edges) and "
            f"have none later; got {[list(o) for o in offsets]}"
        )
    return count
