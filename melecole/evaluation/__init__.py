"""Segmentation evaluation: VI split/merge, adapted Rand error, offenders, CC baseline (numpy in/out)."""

from melecole.evaluation.baseline import BaselineResult, best_threshold_baseline, connected_components_baseline
from melecole.evaluation.contingency import ContingencyTable, contingency_table
from melecole.evaluation.metrics import (
    Offender,
    SegmentationScores,
    adapted_rand_error,
    evaluate_segmentation,
    rand_scores,
    scores_from_table,
    variation_of_information,
)
from melecole.evaluation.volumes import (
    Alignment,
    align_to_gt,
    foreground_probability,
)

__all__ = [
    "Alignment",
    "BaselineResult",
    "best_threshold_baseline",
    "ContingencyTable",
    "Offender",
    "SegmentationScores",
    "adapted_rand_error",
    "align_to_gt",
    "connected_components_baseline",
    "contingency_table",
    "evaluate_segmentation",
    "foreground_probability",
    "rand_scores",
    "scores_from_table",
    "variation_of_information",
]
