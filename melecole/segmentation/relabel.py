"""Relabel one block through the lookup table, then fill its background (numpy in, numpy out).

Background fill (INFERENCE.FILL_BACKGROUND) is done blockwise: a block is read with ``fill_halo``
context, voxels at 0 get a segment inside that padded box (a watershed of the segments on the
box's height map 1 - foreground, or the nearest labelled voxel; INFERENCE.FILL_MODE), and the block
is cropped. This equals the whole-volume fill wherever the segment that fills a voxel reaches it
inside the fill halo; voxels farther than that from every segment keep 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from melecole.segmentation.agglomeration import LookupTable
from melecole.segmentation.postprocess import fill_background

__all__ = ["relabel_block"]


def relabel_block(
    fragments: np.ndarray,
    table: LookupTable,
    inner: Sequence[slice],
    *,
    fill: bool = True,
    heightmap: np.ndarray | None = None,
) -> np.ndarray:
    """Segment ids of one block.

    Args:
        fragments: (Z, Y, X) global fragment ids of the block plus its fill halo.
        table: fragment -> segment lookup (0 for dropped segments).
        inner: the block's slices inside ``fragments``.
        fill: give voxels at 0 a segment (within the padded box).
        heightmap: the fill's height map over ``fragments``' box (watershed fill), or None (nearest).

    Returns:
        uint64 (z, y, x) segmentation of the block.
    """
    if not fill:
        fragments = fragments[tuple(inner)]
    labels = table.apply(fragments)
    if fill:
        block = labels[tuple(inner)]
        # Filling only changes voxels at 0: a block without any needs no distance transform.
        labels = block if block.all() else fill_background(labels, heightmap=heightmap)[tuple(inner)]
    return np.ascontiguousarray(labels)
