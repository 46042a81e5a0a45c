"""Region graph of fragments (blockwise, and INFERENCE.AGGLOMERATION of the whole-volume pipeline):
per pair (u < v) the sum and count of attractive (nearest-neighbour) and
long-range affinities between them, computed per block and reduced (numpy in, numpy out).

A pair of voxels (p, p + o_c) belongs to the block that holds p, so every voxel pair of the volume is
counted exactly once, also across block faces (p + o_c may lie in the next block: the fragments are
read with a halo of at least the offsets' reach). Pairs that leave the volume are never counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import fastremap
import numpy as np

from melecole.inference.mws import number_of_attractive_channels

__all__ = ["RegionGraph", "block_region_graph", "fragment_sizes", "reduce_graphs"]

_FIELDS = ("u", "v", "attractive_sum", "attractive_count", "long_range_sum", "long_range_count")


@dataclass
class RegionGraph:
    """Edges sorted by (u, v), u < v (global fragment ids), with their affinity statistics.

    Attributes:
        u, v: (E,) uint64.
        attractive_sum, attractive_count: (E,) float64 / int64 over nearest-neighbour channels.
        long_range_sum, long_range_count: (E,) float64 / int64 over the other channels.
    """

    u: np.ndarray
    v: np.ndarray
    attractive_sum: np.ndarray
    attractive_count: np.ndarray
    long_range_sum: np.ndarray
    long_range_count: np.ndarray

    def __len__(self) -> int:
        return len(self.u)

    @classmethod
    def empty(cls) -> RegionGraph:
        u = np.zeros(0, np.uint64)
        return cls(u, u.copy(), np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Writes an .npz with the edge columns (and ``extra`` arrays beside them)."""
        np.savez(path, **{name: getattr(self, name) for name in _FIELDS}, **extra)

    @classmethod
    def load(cls, path: str | Path) -> RegionGraph:
        with np.load(path) as data:
            return cls(*(data[name] for name in _FIELDS))


def _pair_keys(
    local: np.ndarray, affinities: np.ndarray, offset: Sequence[int], inner: Sequence[slice], background: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keys min(u, v) * n + max(u, v) (local ids) and affinities of the pairs (p, p + offset), p in inner."""
    shape = local.shape
    source, target, values = [], [], []
    for o, s, n in zip(offset, inner, shape):
        start, stop = max(s.start, -o), min(s.stop, n - o)
        source.append(slice(start, max(start, stop)))
        target.append(slice(start + o, max(start, stop) + o))
        values.append(slice(start - s.start, max(start, stop) - s.start))
    u = local[tuple(source)]
    v = local[tuple(target)]
    keep = (u != v) & (u != background) & (v != background)
    u, v = u[keep].astype(np.int64), v[keep].astype(np.int64)
    n = int(local.max()) + 1 if local.size else 1
    return np.minimum(u, v) * n + np.maximum(u, v), affinities[tuple(values)][keep]


def block_region_graph(
    fragments: np.ndarray,
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    inner: Sequence[slice],
    *,
    mws_weights: bool = False,
) -> RegionGraph:
    """Edges of one block.

    Args:
        fragments: (Z, Y, X) global fragment ids of the block plus a halo of at least the offsets'
            reach (clipped at the volume border, so a pair is valid iff it stays inside this array).
        affinities: (C, z, y, x) float in [0, 1] of the block only (``fragments[inner]``).
        offsets: C offsets, nearest-neighbour first.
        inner: the block's slices inside ``fragments``.
        mws_weights: ``affinities`` holds the mutex watershed's edge weights instead
            (:func:`melecole.inference.mws.mws_weights`: 1 - a on long-range channels); the statistics
            are of the affinities either way.
    """
    ids = fastremap.unique(fragments)  # sorted: local order = global order, so u < v carries over
    local = fastremap.remap(fragments, {int(i): n for n, i in enumerate(ids)}).astype(np.int64)
    background = 0 if len(ids) and ids[0] == 0 else -1
    num_attractive = number_of_attractive_channels(offsets)
    keys: list[list[np.ndarray]] = [[], []]
    values: list[list[np.ndarray]] = [[], []]
    for channel, offset in enumerate(offsets):
        kind = 0 if channel < num_attractive else 1
        key, value = _pair_keys(local, affinities[channel], [int(o) for o in offset], inner, background)
        keys[kind].append(key)
        value = value.astype(np.float64)
        values[kind].append(1.0 - value if kind == 1 and mws_weights else value)
    flat_keys = [np.concatenate(k) if k else np.zeros(0, np.int64) for k in keys]
    unique = np.unique(np.concatenate(flat_keys))
    if len(unique) == 0:
        return RegionGraph.empty()
    stats = []
    for kind in range(2):
        where = np.searchsorted(unique, flat_keys[kind])
        weights = np.concatenate(values[kind]) if values[kind] else np.zeros(0)
        stats.append(np.bincount(where, weights=weights, minlength=len(unique)))
        stats.append(np.bincount(where, minlength=len(unique)).astype(np.int64))
    n = int(local.max()) + 1
    return RegionGraph(ids[unique // n].astype(np.uint64), ids[unique % n].astype(np.uint64), *stats)


def fragment_sizes(fragments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, voxel counts) of the non-zero fragments in ``fragments``, ids sorted."""
    ids, counts = fastremap.unique(fragments, return_counts=True)
    keep = ids != 0
    return ids[keep].astype(np.uint64), counts[keep].astype(np.int64)


def reduce_graphs(graphs: Sequence[RegionGraph]) -> RegionGraph:
    """Sums the statistics of pairs found in several blocks; edges sorted by (u, v).

    Blocks are reduced in the order given (block index order), so float sums do not depend on which
    worker finished first.
    """
    graphs = [g for g in graphs if len(g)]
    if not graphs:
        return RegionGraph.empty()
    columns = {name: np.concatenate([getattr(g, name) for g in graphs]) for name in _FIELDS}
    order = np.lexsort((columns["v"], columns["u"]))
    u, v = columns["u"][order], columns["v"][order]
    starts = np.flatnonzero(np.concatenate([[True], (u[1:] != u[:-1]) | (v[1:] != v[:-1])]))
    summed = [np.add.reduceat(columns[name][order], starts) for name in _FIELDS[2:]]
    return RegionGraph(u[starts], v[starts], *summed)
