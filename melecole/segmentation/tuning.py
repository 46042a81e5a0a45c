"""Exact tuning of the agglomeration from one overlap table (numpy in, numpy out).

Agglomeration maps whole fragments to segments, so the contingency table of any agglomerated
segmentation against the ground truth is the fragment x ground-truth overlap table with its rows
merged (summed) by segment. The fragments and their region graph are computed once; each setting
(mode, threshold) then costs one agglomeration of the graph plus a merge of table rows, with no pass
over the voxels. Conventions are those of :mod:`melecole.evaluation` (docs/ARCHITECTURE.md,
Metrics): ground-truth 0 is left out, a predicted 0 is an ordinary segment.

How the final steps enter (both exact):

- **Size filter** (INFERENCE.MIN_SEGMENT_SIZE): a segment's size is the sum of its fragments' voxel
  counts (all voxels, labelled or not, as the pipeline counts them); the rows of a segment under the
  minimum go to segment 0.
- **Background fill** (INFERENCE.FILL_BACKGROUND): voxels at 0 after the size filter take the nearest
  segment's label. The nearest segment depends on which segments were dropped, so the table alone cannot
  give it: :class:`BackgroundFill` recomputes the fill for exactly the voxels that are 0 before it,
  with the pipeline's own function on the same boxes (the whole volume, or each block with its fill
  halo), and counts only those voxels. Their rows are left out of the merged table and the fill's
  counts are added instead. This is the one step that reads voxels: one distance transform per box
  for each distinct set of dropped fragments (settings that drop the same fragments share it), then
  a gather over the 0 voxels per setting. The same sweep without fill touches no voxel.

Scores come from a ``score(segments, gt, counts)`` callable (the caller passes one built on
:mod:`melecole.evaluation.metrics`, which this numpy-only package does not import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import fastremap
import numpy as np

from melecole.segmentation.agglomeration import LookupTable, agglomerate, agglomeration_mode
from melecole.segmentation.mws import mutex_watershed
from melecole.segmentation.options import SegmentationOptions
from melecole.segmentation.postprocess import fill_background
from melecole.segmentation.region_graph import RegionGraph, block_region_graph, fragment_sizes

__all__ = [
    "BackgroundFill",
    "OverlapTable",
    "Score",
    "TuningPoint",
    "TuningProblem",
    "best_points",
    "lookup_table",
    "merge_pairs",
    "overlap_table",
    "segmentation_overlaps",
    "sum_overlaps",
    "sweep",
    "volume_fragments",
]

Box = tuple[slice, ...]
# score(segment id per pair, gt id per pair, voxels per pair) -> (VI split, VI merge, adapted Rand error)
Score = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, float, float]]


def merge_pairs(first: np.ndarray, second: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums ``counts`` of equal (first, second) pairs: unique pairs sorted by (first, second)."""
    first = np.asarray(first, dtype=np.uint64)
    second = np.asarray(second, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return first[:0], second[:0], counts[:0]
    order = np.lexsort((second, first))
    first, second, counts = first[order], second[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], (first[1:] != first[:-1]) | (second[1:] != second[:-1])]))
    return first[starts], second[starts], np.add.reduceat(counts, starts)


@dataclass
class OverlapTable:
    """Voxels of every (fragment, ground-truth object) overlap; ground-truth 0 is left out, fragment 0
    (background) is a row like any other. Pairs are unique, sorted by (fragment, gt).

    Attributes:
        fragments: (P,) uint64 fragment id of each overlap.
        gt: (P,) uint64 ground-truth id (never 0).
        counts: (P,) int64 voxels (> 0).
    """

    fragments: np.ndarray
    gt: np.ndarray
    counts: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.counts.sum())


def overlap_table(fragments: np.ndarray, gt: np.ndarray) -> OverlapTable:
    """The overlap table of a fragment volume and its ground truth (same shape; one pass over the voxels)."""
    fragments = np.asarray(fragments)
    gt = np.asarray(gt)
    if fragments.shape != gt.shape:
        raise ValueError(f"fragments {fragments.shape} and ground truth {gt.shape} differ in shape")
    labelled = gt != 0
    fragment_local, fragment_ids = _dense(fragments[labelled])
    gt_local, gt_ids = _dense(gt[labelled])
    keys = fragment_local.astype(np.int64) * len(gt_ids) + gt_local
    keys, counts = np.unique(keys, return_counts=True)
    return OverlapTable(fragment_ids[keys // max(len(gt_ids), 1)], gt_ids[keys % max(len(gt_ids), 1)], counts)


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index 0..K-1 of each value, the K sorted distinct values as uint64)."""
    ids, index = np.unique(np.asarray(values).reshape(-1), return_inverse=True)
    return index.reshape(-1), ids.astype(np.uint64)


def sum_overlaps(tables: Iterable[OverlapTable]) -> OverlapTable:
    """One table from several (blocks of one volume: fragment ids are global, so equal pairs add up)."""
    tables = list(tables)
    columns = [np.concatenate([getattr(t, name) for t in tables]) if tables else np.zeros(0) for name in
               ("fragments", "gt", "counts")]
    return OverlapTable(*merge_pairs(*columns))


class BackgroundFill:
    """The exact background fill of a setting, counted over the voxels it changes.

    Which voxel a 0 voxel copies its label from depends only on which voxels are 0 (the background and
    the fragments of dropped segments), so it is computed once per distinct set of dropped fragments
    (with the pipeline's :func:`melecole.segmentation.postprocess.fill_background` on voxel positions)
    and cached; each setting then gathers the segments of those source voxels. This holds for the
    watershed fill too: its flooding order depends on the heights and on which voxels are seeds, not
    on their labels, so the voxel whose label a flooded voxel carries is the same whatever the merge.

    Args:
        fragments: (Z, Y, X) fragment ids of the whole volume (0 = background).
        gt: (Z, Y, X) ground truth (0 = not evaluated).
        boxes: (outer, inner) per fill unit: the box read (absolute slices) and the part written (slices
            inside ``outer``). The whole volume: one box; blocks: each block with its fill halo
            (``BlockPlan.padded(index, fill_halo)``), as :func:`melecole.segmentation.relabel.relabel_block` fills.
        cache_size: sets of dropped fragments whose sources are kept.
        heightmap: the watershed fill's (Z, Y, X) height map of the whole volume
            (:func:`melecole.segmentation.postprocess.fill_heightmap`), or None (nearest fill).
    """

    def __init__(
        self,
        fragments: np.ndarray,
        gt: np.ndarray,
        boxes: Sequence[tuple[Box, Box]],
        cache_size: int = 32,
        heightmap: np.ndarray | None = None,
    ):
        self.ids = fastremap.unique(np.asarray(fragments)).astype(np.uint64)
        self.index = np.searchsorted(self.ids, fragments).astype(np.int32 if len(self.ids) < 2**31 else np.int64)
        self.gt = np.asarray(gt)
        self.boxes = [(tuple(outer), tuple(inner)) for outer, inner in boxes]
        self.cache_size = cache_size
        self.heightmap = heightmap
        self._cache: dict[bytes, list[tuple[np.ndarray, np.ndarray]]] = {}

    def _sources(self, segment_of: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per box with 0 voxels on labelled ground truth: (dense fragment index of the voxel each of them
        copies from, -1 where none is in reach; their ground-truth ids)."""
        key = np.flatnonzero(segment_of == 0).tobytes()
        if key in self._cache:
            return self._cache[key]
        sources = []
        for outer, inner in self.boxes:
            dense = self.index[outer]
            zero = segment_of[dense] == 0
            inner_zero = zero[inner]
            if not inner_zero.any():
                continue
            # Positions + 1 where a segment is, 0 elsewhere: the same mask as the labels, so the fill
            # copies from the same voxel as it does in the pipeline.
            positions = np.arange(1, dense.size + 1, dtype=np.int64).reshape(dense.shape)
            positions[zero] = 0
            heightmap = self.heightmap[outer] if self.heightmap is not None else None
            source = fill_background(positions, heightmap=heightmap)[inner][inner_zero] - 1
            gt = self.gt[outer][inner][inner_zero]
            labelled = gt != 0
            source = source[labelled]
            fragment = np.where(source >= 0, dense.reshape(-1)[np.maximum(source, 0)], -1)
            sources.append((fragment, gt[labelled]))
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = sources
        return sources

    def overlaps(self, table: LookupTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment, gt, voxels) of the voxels that are 0 before the fill, after it (ground-truth 0 left out)."""
        segment_of = table.lookup(self.ids)
        sources = self._sources(segment_of)
        if not sources:
            empty = np.zeros(0, np.uint64)
            return empty, empty, np.zeros(0, np.int64)
        fragment = np.concatenate([source for source, _ in sources])
        gt = np.concatenate([gt for _, gt in sources])
        segments = np.where(fragment >= 0, segment_of[np.maximum(fragment, 0)], np.uint64(0))
        return merge_pairs(segments, gt, np.ones(len(gt), np.int64))


@dataclass
class TuningProblem:
    """Everything a sweep needs, computed once.

    Attributes:
        graph: the fragments' region graph.
        nodes: (N,) sorted fragment ids (every fragment, 0 excluded).
        sizes: (N,) voxels per fragment (all voxels, labelled or not).
        overlaps: the fragment x ground-truth table.
        min_size: INFERENCE.MIN_SEGMENT_SIZE (segments under it become 0).
        fill: the exact background fill, or None (INFERENCE.FILL_BACKGROUND off: 0 stays a segment).
    """

    graph: RegionGraph
    nodes: np.ndarray
    sizes: np.ndarray
    overlaps: OverlapTable
    min_size: int = 0
    fill: BackgroundFill | None = None


@dataclass(frozen=True)
class TuningPoint:
    """The scores of one setting (VI in bits; ``segments``: non-zero segments of the lookup table)."""

    mode: str
    threshold: float | None
    vi_split: float
    vi_merge: float
    arand: float
    segments: int

    @property
    def vi_total(self) -> float:
        return self.vi_split + self.vi_merge


def lookup_table(problem: TuningProblem, mode: str, threshold: float) -> LookupTable:
    """The fragment -> segment table of a setting, size filter included; ``none``: every fragment is a
    segment (``infer.py`` without agglomeration)."""
    if mode != "none":
        return agglomerate(
            problem.graph, problem.nodes, problem.sizes, mode=mode, threshold=threshold, min_size=problem.min_size
        )
    keep = np.asarray(problem.sizes) >= max(int(problem.min_size), 1)
    return LookupTable(problem.nodes, np.where(keep, np.cumsum(keep), 0).astype(np.uint64))


def segmentation_overlaps(problem: TuningProblem, table: LookupTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment, gt, voxels) per overlap of the final segmentation of ``table``: merged table rows, and,
    with the fill, the rows at 0 replaced by the fill's counts."""
    overlaps = problem.overlaps
    segments = table.lookup(overlaps.fragments)
    if problem.fill is None:
        return merge_pairs(segments, overlaps.gt, overlaps.counts)
    kept = segments != 0
    filled = problem.fill.overlaps(table)
    return merge_pairs(
        np.concatenate([segments[kept], filled[0]]),
        np.concatenate([overlaps.gt[kept], filled[1]]),
        np.concatenate([overlaps.counts[kept], filled[2]]),
    )


def sweep(
    problem: TuningProblem, modes: Sequence[str], thresholds: Sequence[float], score: Score
) -> list[TuningPoint]:
    """Scores of every mode at every threshold (one point for modes without a threshold: ``mws``, ``none``)."""
    points = []
    for mode in modes:
        uses_threshold = mode != "none" and agglomeration_mode(mode).uses_threshold
        for threshold in thresholds if uses_threshold else [None]:
            table = lookup_table(problem, mode, 0.5 if threshold is None else float(threshold))
            vi_split, vi_merge, arand = score(*segmentation_overlaps(problem, table))
            points.append(TuningPoint(mode, threshold, vi_split, vi_merge, arand, table.num_segments))
    return points


def best_points(points: Sequence[TuningPoint]) -> dict[str, TuningPoint]:
    """The lowest-VI (split + merge) point of each mode (ties: the first)."""
    best: dict[str, TuningPoint] = {}
    for point in points:
        if point.mode not in best or point.vi_total < best[point.mode].vi_total:
            best[point.mode] = point
    return best


def volume_fragments(
    weights: np.ndarray, foreground: np.ndarray | None, options: SegmentationOptions, background: float
) -> tuple[np.ndarray, RegionGraph, np.ndarray, np.ndarray]:
    """The fragments of ``infer.py``'s segmentation (:func:`melecole.segmentation.volume.segment_volume`):
    the voxel mutex watershed, its region graph and fragment sizes, as the agglomeration sees them.

    Returns:
        (uint64 (Z, Y, X) fragments, region graph, sorted fragment ids, voxels per fragment).
    """
    labels = mutex_watershed(
        weights, options.offsets, foreground=foreground, background_threshold=background,
        strides=options.strides, randomized=options.randomized, weights_ready=True,
        foreground_power=options.foreground_power,
    )
    whole = tuple(slice(0, size) for size in labels.shape)
    graph = block_region_graph(labels, weights, options.offsets, whole, mws_weights=True)
    ids, sizes = fragment_sizes(labels)
    return labels, graph, ids, sizes
