"""Clean-up of a mutex-watershed segmentation: drop tiny segments, give every voxel a segment.

SNEMI3D-style ground truth has no boundary class between touching neurons, and a predicted label 0
is scored as one (huge) ordinary segment, so voxels the foreground mask left at 0 are assigned to
the nearest segment. Numpy in, numpy out.
"""

from __future__ import annotations

from typing import Sequence

import fastremap
import numpy as np
from scipy import ndimage

__all__ = ["remove_small_segments", "fill_background", "postprocess_segmentation"]


def remove_small_segments(
    segmentation: np.ndarray, min_size: int, in_place: bool = False, keep: np.ndarray | None = None
) -> np.ndarray:
    """Sets segments with fewer than ``min_size`` voxels to 0 (label 0 itself is left as is), except the
    ids in ``keep``. Returns ``segmentation`` itself when nothing is removed."""
    if min_size <= 1:
        return segmentation
    ids, counts = fastremap.unique(segmentation, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    if keep is not None and len(small):
        small = np.setdiff1d(small, keep)
    if len(small) == 0:
        return segmentation
    return fastremap.mask(segmentation, small, in_place=in_place)


def fill_background(segmentation: np.ndarray, sampling: Sequence[float] | None = None) -> np.ndarray:
    """Every voxel labelled 0 takes the label of the nearest labelled voxel (Euclidean, in voxel units
    scaled by ``sampling`` (z, y, x)). An all-zero volume is returned unchanged."""
    background = segmentation == 0
    if not background.any() or background.all():
        return segmentation
    indices = ndimage.distance_transform_edt(
        background, sampling=sampling, return_distances=False, return_indices=True
    )
    return segmentation[tuple(indices)]


def postprocess_segmentation(
    segmentation: np.ndarray,
    *,
    min_size: int = 0,
    fill: bool = True,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    """Removes segments below ``min_size`` voxels, fills label 0 from the nearest segment (``fill``),
    and renumbers the labels consecutively from 1 (0 stays 0). Returns a new uint64 array."""
    segmentation = remove_small_segments(np.array(segmentation, dtype=np.uint64, copy=True), min_size, in_place=True)
    if fill:
        segmentation = fill_background(segmentation, sampling)
    segmentation, _ = fastremap.renumber(segmentation, in_place=True)
    return segmentation.astype(np.uint64, copy=False)
