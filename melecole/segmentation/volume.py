"""A whole volume in one piece (``infer.py``): voxel mutex watershed, optional agglomeration of its
segments on their region graph (the blockwise algorithm on one block), post-processing."""

from __future__ import annotations

import logging

import numpy as np

from melecole.segmentation.agglomeration import agglomerate
from melecole.segmentation.mws import mutex_watershed
from melecole.segmentation.options import SegmentationOptions
from melecole.segmentation.postprocess import fill_heightmap, postprocess_segmentation
from melecole.segmentation.region_graph import block_region_graph, fragment_sizes

__all__ = ["agglomerate_segments", "segment_volume"]

logger = logging.getLogger(__name__)


def agglomerate_segments(labels: np.ndarray, weights: np.ndarray, options: SegmentationOptions) -> np.ndarray:
    """INFERENCE.AGGLOMERATION: the watershed's segments merged on their region graph (mean affinities
    over each contact; a mode of :data:`melecole.segmentation.agglomeration.AGGLOMERATION_MODES`).

    Args:
        labels: uint64 (Z, Y, X) watershed segments, 0 = background.
        weights: the mutex watershed's edge weights (:func:`melecole.segmentation.mws.mws_weights`).
        options: offsets, agglomeration mode and threshold.
    """
    whole = tuple(slice(0, size) for size in labels.shape)
    graph = block_region_graph(labels, weights, options.offsets, whole, mws_weights=True)
    ids, sizes = fragment_sizes(labels)
    table = agglomerate(
        graph, ids, sizes, mode=options.agglomeration, threshold=options.agglomeration_threshold, min_size=0
    )
    logger.info("agglomeration (%s): %d segments -> %d", options.agglomeration, len(ids), table.num_segments)
    return table.apply(labels)


def segment_volume(
    weights: np.ndarray, foreground: np.ndarray | None, options: SegmentationOptions, background: float
) -> np.ndarray:
    """Mutex watershed of a whole volume at foreground threshold ``background``, then (if
    ``options.agglomeration`` is not ``none``) agglomeration, size filter and background fill (a
    watershed on 1 - ``foreground`` with ``options.fill_mode`` watershed).

    Args:
        weights: float32 (C, Z, Y, X) mutex-watershed edge weights (:func:`melecole.segmentation.mws.mws_weights`).
        foreground: optional (Z, Y, X) foreground probability.
        options: the ``volume`` schedule's options.
        background: foreground probability below which voxels are background.

    Returns:
        uint64 (Z, Y, X) labels.
    """
    logger.info("mutex watershed (background threshold %.2f)", background)
    labels = mutex_watershed(
        weights, options.offsets, foreground=foreground, background_threshold=background,
        strides=options.strides, randomized=options.randomized, weights_ready=True,
        foreground_power=options.foreground_power,
    )
    if options.agglomeration != "none":
        labels = agglomerate_segments(labels, weights, options)
    heightmap = fill_heightmap(foreground, options.fill_mode) if options.fill_background else None
    return postprocess_segmentation(
        labels, min_size=options.min_segment_size, fill=options.fill_background, heightmap=heightmap
    )
