"""Offset pairs on a grid: the voxels p whose partner p + offset lies inside (affinities, losses)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["offset_slices"]


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
