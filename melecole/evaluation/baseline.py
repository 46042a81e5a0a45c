"""The classical baseline: connected components of a thresholded map (foreground probability or raw).

One implementation serves the demo table, ``variation_of_information.py --membranes``, the
synthetic dataset's sanity check and the quality benchmarks: threshold, 3D connected components
(6-connected), optional post-processing, and, for :func:`best_threshold_baseline`, the threshold
with the lowest VI total on the given ground truth (an oracle choice, so an optimistic baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cc3d
import numpy as np

from melecole.errors import DataError
from melecole.evaluation.metrics import SegmentationScores, evaluate_segmentation

__all__ = ["BaselineResult", "best_threshold_baseline", "connected_components_baseline"]


def connected_components_baseline(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Baseline segmentation: connected components of ``probability > threshold``.

    Args:
        probability: (Z, Y, X) foreground probability (or (Y, X)), or any map where high means
            "inside an object" (e.g. raw intensities with a raw threshold).
        threshold: voxels strictly above it are foreground.

    Returns:
        uint32/uint64 labels of the same shape; 0 = background (face connectivity: 6 in 3D, 4 in 2D).
    """
    if probability.ndim not in (2, 3):
        raise DataError(f"foreground probability must be 2D or 3D, got shape {probability.shape}")
    connectivity = 6 if probability.ndim == 3 else 4
    return cc3d.connected_components(np.asarray(probability) > threshold, connectivity=connectivity)


@dataclass
class BaselineResult:
    """The best threshold, its segmentation and its scores."""

    threshold: float
    segmentation: np.ndarray
    scores: SegmentationScores


def best_threshold_baseline(
    values: np.ndarray,
    gt: np.ndarray,
    thresholds: Sequence[float],
    *,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> BaselineResult:
    """Connected components at each threshold, scored against ``gt``; the lowest VI total wins
    (the first one on ties).

    Args:
        values: (Z, Y, X) map, high inside objects (foreground probability, smoothed raw, ...).
        gt: (Z, Y, X) ground truth, 0 ignored (VI in bits).
        thresholds: candidate thresholds, in the unit of ``values``.
        postprocess: applied to each segmentation before scoring (e.g. the watershed's
            small-segment removal and background fill, for a fair comparison).
    """
    if len(thresholds) == 0:
        raise ValueError("best_threshold_baseline needs at least one threshold")
    best: BaselineResult | None = None
    for threshold in thresholds:
        segmentation = connected_components_baseline(values, threshold=threshold)
        if postprocess is not None:
            segmentation = postprocess(segmentation)
        scores = evaluate_segmentation(segmentation, gt, top_k=0)
        if best is None or scores.vi_total < best.scores.vi_total:
            best = BaselineResult(float(threshold), segmentation, scores)
    assert best is not None
    return best
