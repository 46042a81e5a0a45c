"""Padding and crops: the one place that maps a padded volume to its labelled (inner) region.

Raw volumes may carry DATASET.PADDING context voxels on each side (docs/ARCHITECTURE.md, Dataset layout):
raw index = label index + padding. Predictions cover the labelled region; viewers and evaluation
crop whichever volume is larger. Crops are views (numpy) or lazy windows (:class:`LazyVolume`).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["crop_per_side", "inner_region", "symmetric_padding"]


def symmetric_padding(outer_shape: Sequence[int], inner_shape: Sequence[int]) -> tuple[int, ...] | None:
    """Per-side padding p with ``outer_shape == inner_shape + 2 p`` (p >= 0 on every axis), else None."""
    difference = [int(o) - int(i) for o, i in zip(outer_shape, inner_shape)]
    if len(outer_shape) != len(inner_shape) or min(difference) < 0 or any(d % 2 for d in difference):
        return None
    return tuple(d // 2 for d in difference)


def inner_region(padding: Sequence[int], inner_shape: Sequence[int]) -> tuple[slice, ...]:
    """Slices of the padded volume that hold the inner region (raw index = inner index + padding)."""
    return tuple(slice(int(p), int(p) + int(s)) for p, s in zip(padding, inner_shape))


def crop_per_side(array: Any, per_side: Sequence[int]) -> Any:
    """``array`` without ``per_side[a]`` voxels at both ends of each trailing axis a.

    Leading axes (channels) are kept. numpy arrays give a view, lazy volumes a lazy window.
    """
    spatial = array.shape[-len(per_side) :]
    window = (Ellipsis,) + tuple(slice(int(p), int(size) - int(p)) for p, size in zip(per_side, spatial))
    crop = getattr(array, "crop", None)
    return crop(window) if crop is not None else array[window]
