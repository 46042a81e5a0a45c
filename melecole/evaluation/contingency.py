"""Sparse contingency table between a segmentation and a ground truth.

The table is the only pass over the voxels; every score (VI, adapted Rand, offenders, object
counts, size histograms) is computed from it. It is built slab by slab (about 4 M voxels each)
so the extra memory is bounded by the slab, not by the volume:

1. encode each voxel's (segment, GT object) pair as one integer key
   ``(seg - seg_min) * gt_range + (gt - gt_min)``. The label ranges come from one min/max pass;
   when their product does not fit in 63 bits (huge scattered ids), each slab is first renumbered
   to consecutive ids with fastremap instead;
2. count the keys of the slab with np.unique (a vectorised sort), decode them back to labels and
   drop the ignored ones (GT 0, and predicted 0 in the original convention) - after counting, so
   no masked copy of the volumes is ever made;
3. merge the per-slab tables (pairs, not voxels) with one small np.unique at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import fastremap
import numpy as np

from melecole.errors import DataError

# Voxels per slab: 2**22 keeps the reused per-slab buffers (uint64 keys + bool scratch) at ~40 MB.
DEFAULT_CHUNK_VOXELS = 1 << 22
_KEY_LIMIT = (1 << 63) - 1


@dataclass(frozen=True)
class ContingencyTable:
    """Overlap counts between predicted segments and GT objects over the evaluated voxels.

    Attributes:
        segmentation_ids: (S,) sorted predicted labels present in the evaluated voxels.
        gt_ids: (G,) sorted GT labels present in the evaluated voxels.
        pair_segmentation: (P,) index into ``segmentation_ids`` of each non-empty overlap.
        pair_gt: (P,) index into ``gt_ids`` of each non-empty overlap.
        pair_count: (P,) int64 voxels in the overlap; all > 0.
        segmentation_sizes: (S,) int64 evaluated voxels per predicted segment.
        gt_sizes: (G,) int64 evaluated voxels per GT object.
        n_voxels: evaluated voxels (the sum of ``pair_count``).
        n_total_voxels: voxels in the volume, evaluated or not.
    """

    segmentation_ids: np.ndarray
    gt_ids: np.ndarray
    pair_segmentation: np.ndarray
    pair_gt: np.ndarray
    pair_count: np.ndarray
    segmentation_sizes: np.ndarray
    gt_sizes: np.ndarray
    n_voxels: int
    n_total_voxels: int

    @property
    def n_segmentation(self) -> int:
        """Number of predicted segments that overlap the evaluated voxels (0 included if present)."""
        return int(self.segmentation_ids.size)

    @property
    def n_gt(self) -> int:
        """Number of GT objects in the evaluated voxels."""
        return int(self.gt_ids.size)


def _check_label_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integer labels, got dtype {array.dtype}")
    return array


def _slabs(array: np.ndarray, chunk_voxels: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges along axis 0 holding about ``chunk_voxels`` voxels each."""
    per_row = int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else 1
    rows = max(1, chunk_voxels // max(per_row, 1))
    for start in range(0, array.shape[0], rows):
        yield start, min(start + rows, array.shape[0])


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids 0..K-1 for ``labels`` and the (K,) original label of each id."""
    renumbered, mapping = fastremap.renumber(labels, start=0, preserve_zero=False)
    originals = np.fromiter(mapping.keys(), dtype=labels.dtype, count=len(mapping))
    local = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
    order = np.empty(len(mapping), dtype=labels.dtype)
    order[local] = originals
    return renumbered, order


def _as_unsigned(value: int) -> np.uint64:
    """``value`` modulo 2**64: offsets are subtracted with wrap-around in uint64 arithmetic."""
    return np.uint64(int(value) % (1 << 64))


def _unique_counts_in_place(keys: np.ndarray, change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorts the 1D ``keys`` in place; returns (distinct keys, int64 counts). ``change``: bool scratch.

    numpy's vectorised sort beat collapsing runs of equal keys first (measured on Voronoi labels).
    """
    keys.sort()
    change = change[: keys.size]
    change[0] = True
    np.not_equal(keys[1:], keys[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    return keys[starts], np.diff(starts, append=keys.size).astype(np.int64)


class _SlabCounter:
    """Counts the (segment, GT) pairs of one slab at a time, reusing its key and scratch buffers.

    Keys are ``(seg - seg_min) * gt_range + (gt - gt_min)``, computed in uint64 with wrap-around
    (negative labels wrap and the offsets undo it); they are exact because the caller checked
    that the product of the label ranges is below 2**63. Reusing the buffers avoids paying
    fresh-page faults for every slab.
    """

    def __init__(
        self, segmentation: np.ndarray, gt: np.ndarray, seg_min: int, gt_min: int, gt_range: int, voxels: int
    ):
        self.seg_min, self.gt_min = _as_unsigned(seg_min), _as_unsigned(gt_min)
        self.gt_range = np.uint64(gt_range)
        self.seg_dtype, self.gt_dtype = segmentation.dtype, gt.dtype
        self.keys = np.empty(voxels, dtype=np.uint64)
        self.change = np.empty(voxels, dtype=bool)

    def count(self, seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment label, GT label, voxels) of every overlap in the slab ``seg``/``gt`` (same shape)."""
        flat = self.keys[: seg.size]
        keys = flat.reshape(seg.shape)
        np.copyto(keys, seg, casting="unsafe")
        if self.seg_min:
            keys -= self.seg_min
        keys *= self.gt_range
        np.add(keys, gt, out=keys, dtype=np.uint64, casting="unsafe")
        if self.gt_min:
            keys -= self.gt_min
        unique_keys, counts = _unique_counts_in_place(flat, self.change)
        seg_labels = (unique_keys // self.gt_range + self.seg_min).astype(self.seg_dtype)
        gt_labels = (unique_keys % self.gt_range + self.gt_min).astype(self.gt_dtype)
        return seg_labels, gt_labels, counts


def _count_slab_renumbered(seg: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :meth:`_SlabCounter.count` for ids too scattered for one 63-bit key: the slab is first
    renumbered to consecutive local ids (fastremap hash map, linear time)."""
    seg_local, seg_originals = _renumber(seg.reshape(-1))
    gt_local, gt_originals = _renumber(gt.reshape(-1))
    keys = seg_local.astype(np.int64)
    keys *= gt_originals.size
    keys += gt_local
    keys, counts = _unique_counts_in_place(keys, np.empty(keys.size, dtype=bool))
    return seg_originals[keys // gt_originals.size], gt_originals[keys % gt_originals.size], counts


def _key_counter(segmentation: np.ndarray, gt: np.ndarray, slabs: list[tuple[int, int]]) -> _SlabCounter | None:
    """A single-key counter sized for the largest slab, or None when the label ranges need 63+ bits."""
    if not slabs:
        return None
    seg_min, seg_max = int(segmentation.min()), int(segmentation.max())
    gt_min, gt_max = int(gt.min()), int(gt.max())
    gt_range = gt_max - gt_min + 1
    if (seg_max - seg_min + 1) * gt_range > _KEY_LIMIT:
        return None
    largest = max(segmentation[start:stop].size for start, stop in slabs)
    return _SlabCounter(segmentation, gt, seg_min, gt_min, gt_range, largest)


def _drop_ignored(
    seg_labels: np.ndarray,
    gt_labels: np.ndarray,
    counts: np.ndarray,
    *,
    ignore_gt_zero: bool,
    ignore_segmentation_zero: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (P,) slab table without the ignored pairs.

    Ignored labels are dropped from the (small) slab table, never by masking the voxels.
    """
    keep = None
    if ignore_gt_zero:
        keep = gt_labels != 0
    if ignore_segmentation_zero:
        keep = seg_labels != 0 if keep is None else keep & (seg_labels != 0)
    if keep is not None:
        seg_labels, gt_labels, counts = seg_labels[keep], gt_labels[keep], counts[keep]
    return seg_labels, gt_labels, counts


def _empty_table(seg_dtype: np.dtype, gt_dtype: np.dtype, n_total_voxels: int) -> ContingencyTable:
    """The table of a volume with no evaluated voxels."""
    empty_index = np.zeros(0, dtype=np.int64)
    return ContingencyTable(
        segmentation_ids=np.zeros(0, dtype=seg_dtype),
        gt_ids=np.zeros(0, dtype=gt_dtype),
        pair_segmentation=empty_index,
        pair_gt=empty_index,
        pair_count=empty_index,
        segmentation_sizes=empty_index,
        gt_sizes=empty_index,
        n_voxels=0,
        n_total_voxels=n_total_voxels,
    )


def _merge_slab_tables(
    seg_parts: list[np.ndarray], gt_parts: list[np.ndarray], count_parts: list[np.ndarray], n_total_voxels: int
) -> ContingencyTable:
    """Merges the per-slab (segment label, GT label, voxels) tables: small arrays (pairs, not voxels)."""
    segmentation_ids, seg_index = np.unique(np.concatenate(seg_parts), return_inverse=True)
    gt_ids, gt_index = np.unique(np.concatenate(gt_parts), return_inverse=True)
    counts = np.concatenate(count_parts)
    keys = seg_index.astype(np.int64).reshape(-1) * gt_ids.size + gt_index.reshape(-1)
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    pair_count = np.zeros(unique_keys.size, dtype=np.int64)
    np.add.at(pair_count, inverse.reshape(-1), counts)
    pair_segmentation = unique_keys // gt_ids.size
    pair_gt = unique_keys % gt_ids.size
    return ContingencyTable(
        segmentation_ids=segmentation_ids,
        gt_ids=gt_ids,
        pair_segmentation=pair_segmentation,
        pair_gt=pair_gt,
        pair_count=pair_count,
        segmentation_sizes=np.bincount(pair_segmentation, weights=pair_count, minlength=segmentation_ids.size)
        .round()
        .astype(np.int64),
        gt_sizes=np.bincount(pair_gt, weights=pair_count, minlength=gt_ids.size).round().astype(np.int64),
        n_voxels=int(pair_count.sum()),
        n_total_voxels=n_total_voxels,
    )


def contingency_table(
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    ignore_gt_zero: bool = True,
    ignore_segmentation_zero: bool = False,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> ContingencyTable:
    """Counts the voxels of every (predicted segment, GT object) overlap.

    Args:
        segmentation: integer labels, any shape; label 0 is an ordinary segment unless
            ``ignore_segmentation_zero``.
        gt: integer labels of the same shape; voxels with label 0 are dropped if ``ignore_gt_zero``.
        ignore_gt_zero: drop voxels where ``gt == 0`` (boundary / unlabelled, the default).
        ignore_segmentation_zero: also drop voxels where ``segmentation == 0`` (only for the
            original MeLeCoLe numbers; it lets a prediction hide its errors as background).
        chunk_voxels: voxels per slab; bounds the extra memory. Inputs are never modified.

    Returns:
        The sparse table (labels keep their input dtype).

    Raises:
        DataError: shapes differ or a volume does not hold integer labels.
    """
    segmentation = _check_label_volume(segmentation, "segmentation")
    gt = _check_label_volume(gt, "ground truth")
    if segmentation.shape != gt.shape:
        raise DataError(f"segmentation shape {segmentation.shape} != ground-truth shape {gt.shape}")
    if segmentation.ndim == 0:
        segmentation, gt = segmentation.reshape(1), gt.reshape(1)

    slabs = list(_slabs(segmentation, chunk_voxels)) if segmentation.size else []
    counter = _key_counter(segmentation, gt, slabs)
    count = counter.count if counter is not None else _count_slab_renumbered
    seg_parts: list[np.ndarray] = []
    gt_parts: list[np.ndarray] = []
    count_parts: list[np.ndarray] = []
    for start, stop in slabs:
        seg_labels, gt_labels, counts = _drop_ignored(
            *count(segmentation[start:stop], gt[start:stop]),
            ignore_gt_zero=ignore_gt_zero,
            ignore_segmentation_zero=ignore_segmentation_zero,
        )
        if counts.size:
            seg_parts.append(seg_labels)
            gt_parts.append(gt_labels)
            count_parts.append(counts)
    if not count_parts:
        return _empty_table(segmentation.dtype, gt.dtype, int(segmentation.size))
    return _merge_slab_tables(seg_parts, gt_parts, count_parts, int(segmentation.size))
