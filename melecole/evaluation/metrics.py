"""Variation of information and adapted Rand error from one sparse contingency table.

Conventions (docs: docs/ARCHITECTURE.md, Metrics):

- VI split = H(seg | gt) (over-segmentation), VI merge = H(gt | seg) (under-segmentation), in bits
  by default. GT label 0 (boundary / unlabelled) is ignored; predicted label 0 is an ordinary
  segment, so labelling a voxel 0 never removes it from the evaluation.
- Adapted Rand error as in SNEMI3D: 1 - F-score of the Rand precision (pairs of voxels in one
  predicted segment that are also in one GT object) and Rand recall (pairs in one GT object that
  are also in one predicted segment), counted over ordered pairs of distinct voxels.
  skimage.metrics.adapted_rand_error computes the same error but returns precision and recall
  swapped (scikit-image issue #6485); here precision drops with merges and recall with splits.
- ``compat_original=True`` reproduces the original MeLeCoLe numbers: natural log and voxels that
  are 0 in either volume ignored (a prediction can then hide errors by predicting background).

Every function takes ``(segmentation, gt)`` in this order (skimage takes the GT first).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from melecole.errors import DataError
from melecole.evaluation.contingency import ContingencyTable, contingency_table

PARTNERS_SHOWN = 5


@dataclass(frozen=True)
class Offender:
    """One object responsible for a large share of VI merge (a predicted segment) or VI split (a GT object).

    Attributes:
        label: the predicted id (merge offender) or GT id (split offender).
        size: evaluated voxels of that object.
        n_partners: objects of the other volume it overlaps (GT objects merged / segments split into).
        vi_contribution: its term of VI merge or VI split, in the scores' unit.
        largest_partners: up to five (partner id, overlap voxels), largest overlap first.
    """

    label: int
    size: int
    n_partners: int
    vi_contribution: float
    largest_partners: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one segmentation against one ground truth; lower is better except precision/recall."""

    vi_split: float
    vi_merge: float
    vi_total: float
    arand: float
    rand_precision: float
    rand_recall: float
    n_gt: int
    n_seg: int
    n_voxels: int
    unit: str
    compat_original: bool
    merge_offenders: list[Offender]
    split_offenders: list[Offender]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (offenders as lists of dicts)."""
        return asdict(self)


def _log(values: np.ndarray, log_base: float) -> np.ndarray:
    if log_base == 2:
        return np.log2(values)
    if log_base == math.e:
        return np.log(values)
    return np.log(values) / math.log(log_base)


def _unit(log_base: float) -> str:
    if log_base == 2:
        return "bits"
    if log_base == math.e:
        return "nats"
    return f"log{log_base:g}"


def conditional_entropies(table: ContingencyTable, *, log_base: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-object VI terms: ``(split_per_gt (G,), merge_per_segment (S,))``.

    ``split_per_gt.sum()`` is H(seg | gt) and ``merge_per_segment.sum()`` is H(gt | seg).
    """
    if table.n_voxels == 0:
        raise DataError("no voxels to evaluate: the ground truth has no labelled (non-zero) voxel here")
    counts = table.pair_count.astype(np.float64)
    weights = counts / table.n_voxels
    split_terms = -weights * _log(counts / table.gt_sizes[table.pair_gt], log_base)
    merge_terms = -weights * _log(counts / table.segmentation_sizes[table.pair_segmentation], log_base)
    split_per_gt = np.bincount(table.pair_gt, weights=split_terms, minlength=table.n_gt)
    merge_per_segment = np.bincount(
        table.pair_segmentation, weights=merge_terms, minlength=table.n_segmentation
    )
    # -p log p of a pair that fills its whole object is -p * log(1) = -0.0; keep the sums tidy.
    return np.maximum(split_per_gt, 0.0), np.maximum(merge_per_segment, 0.0)


def rand_scores(table: ContingencyTable) -> tuple[float, float, float]:
    """``(adapted Rand error, Rand precision, Rand recall)`` from the table (SNEMI3D definition).

    Pairs are ordered pairs of distinct voxels. A volume without any such pair in the prediction
    (or the GT) has precision (recall) 1 by convention.
    """
    if table.n_voxels == 0:
        raise DataError("no voxels to evaluate: the ground truth has no labelled (non-zero) voxel here")
    counts = table.pair_count.astype(np.float64)
    seg_sizes = table.segmentation_sizes.astype(np.float64)
    gt_sizes = table.gt_sizes.astype(np.float64)
    n = float(table.n_voxels)
    pairs_both = counts @ counts - n
    pairs_seg = seg_sizes @ seg_sizes - n
    pairs_gt = gt_sizes @ gt_sizes - n
    precision = pairs_both / pairs_seg if pairs_seg > 0 else 1.0
    recall = pairs_both / pairs_gt if pairs_gt > 0 else 1.0
    denominator = pairs_seg + pairs_gt
    fscore = 2.0 * pairs_both / denominator if denominator > 0 else 1.0
    return 1.0 - fscore, precision, recall


def _offenders(table: ContingencyTable, per_object: np.ndarray, *, merge: bool, top_k: int) -> list[Offender]:
    """The ``top_k`` objects with the largest VI contribution among those overlapping >= 2 partners."""
    if top_k <= 0:
        return []
    own_index = table.pair_segmentation if merge else table.pair_gt
    partner_index = table.pair_gt if merge else table.pair_segmentation
    own_ids = table.segmentation_ids if merge else table.gt_ids
    partner_ids = table.gt_ids if merge else table.segmentation_ids
    sizes = table.segmentation_sizes if merge else table.gt_sizes
    n_partners = np.bincount(own_index, minlength=own_ids.size)
    candidates = np.flatnonzero(n_partners >= 2)
    order = candidates[np.argsort(-per_object[candidates], kind="stable")][:top_k]
    offenders = []
    for index in order:
        rows = np.flatnonzero(own_index == index)
        rows = rows[np.argsort(-table.pair_count[rows], kind="stable")][:PARTNERS_SHOWN]
        offenders.append(
            Offender(
                label=int(own_ids[index]),
                size=int(sizes[index]),
                n_partners=int(n_partners[index]),
                vi_contribution=float(per_object[index]),
                largest_partners=[
                    (int(partner_ids[partner_index[row]]), int(table.pair_count[row])) for row in rows
                ],
            )
        )
    return offenders


def scores_from_table(
    table: ContingencyTable, *, log_base: float = 2.0, top_k: int = 10, compat_original: bool = False
) -> SegmentationScores:
    """All scores from a contingency table (see :func:`evaluate_segmentation`)."""
    split_per_gt, merge_per_segment = conditional_entropies(table, log_base=log_base)
    arand, precision, recall = rand_scores(table)
    vi_split = float(split_per_gt.sum())
    vi_merge = float(merge_per_segment.sum())
    return SegmentationScores(
        vi_split=vi_split,
        vi_merge=vi_merge,
        vi_total=vi_split + vi_merge,
        arand=float(arand),
        rand_precision=float(precision),
        rand_recall=float(recall),
        n_gt=table.n_gt,
        n_seg=table.n_segmentation,
        n_voxels=table.n_voxels,
        unit=_unit(log_base),
        compat_original=compat_original,
        merge_offenders=_offenders(table, merge_per_segment, merge=True, top_k=top_k),
        split_offenders=_offenders(table, split_per_gt, merge=False, top_k=top_k),
    )


def build_table(
    segmentation: np.ndarray, gt: np.ndarray, *, ignore_gt_zero: bool = True, compat_original: bool = False
) -> ContingencyTable:
    """The contingency table under the project's conventions (or the original ones if ``compat_original``)."""
    return contingency_table(
        segmentation,
        gt,
        ignore_gt_zero=ignore_gt_zero or compat_original,
        ignore_segmentation_zero=compat_original,
    )


def evaluate_segmentation(
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    log_base: float = 2.0,
    ignore_gt_zero: bool = True,
    compat_original: bool = False,
    top_k: int = 10,
) -> SegmentationScores:
    """VI split/merge/total, adapted Rand error, object counts and the worst offenders.

    Args:
        segmentation: predicted integer labels (Z, Y, X) (any shape); 0 is an ordinary segment.
        gt: ground-truth integer labels of the same shape; 0 = boundary / unlabelled.
        log_base: 2 for bits (default), ``math.e`` for nats.
        ignore_gt_zero: drop voxels with ``gt == 0`` (default). False treats 0 as an object.
        compat_original: the original MeLeCoLe numbers: natural log, voxels that are 0 in either
            volume ignored; overrides ``log_base`` and ``ignore_gt_zero``.
        top_k: number of merge and split offenders to report.

    Returns:
        The scores; ``n_seg`` counts predicted segments that overlap the evaluated voxels.

    Raises:
        DataError: shapes differ, labels are not integers, or no voxel is left to evaluate.
    """
    if compat_original:
        log_base = math.e
    table = build_table(segmentation, gt, ignore_gt_zero=ignore_gt_zero, compat_original=compat_original)
    return scores_from_table(table, log_base=log_base, top_k=top_k, compat_original=compat_original)


def variation_of_information(
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    log_base: float = 2.0,
    ignore_gt_zero: bool = True,
    compat_original: bool = False,
) -> tuple[float, float]:
    """``(VI split, VI merge)`` = ``(H(seg | gt), H(gt | seg))``; see :func:`evaluate_segmentation`."""
    if compat_original:
        log_base = math.e
    table = build_table(segmentation, gt, ignore_gt_zero=ignore_gt_zero, compat_original=compat_original)
    split_per_gt, merge_per_segment = conditional_entropies(table, log_base=log_base)
    return float(split_per_gt.sum()), float(merge_per_segment.sum())


def adapted_rand_error(
    segmentation: np.ndarray, gt: np.ndarray, *, ignore_gt_zero: bool = True, compat_original: bool = False
) -> float:
    """SNEMI3D adapted Rand error (1 - F-score of Rand precision and recall); 0 is perfect."""
    table = build_table(segmentation, gt, ignore_gt_zero=ignore_gt_zero, compat_original=compat_original)
    return rand_scores(table)[0]
