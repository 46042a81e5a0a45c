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

from melecole.io.codec import decode_probabilities
from melecole.utils.offsets import number_of_attractive_channels

__all__ = ["RegionGraph", "block_region_graph", "fragment_sizes", "reduce_graphs"]

# Blocks with n local ids count edges in a dense n * n table up to this size (n <= 2048: 32 MB per
# statistic, 5 at once), and sort the pair keys beyond it.
DENSE_KEYS = 1 << 22

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
    local: np.ndarray, affinities: np.ndarray, offset: Sequence[int], inner: Sequence[slice], n: int,
    background: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Keys min(u, v) * n + max(u, v) of the pairs (p, p + offset), p in inner, of two different
    fragments (local ids; 0 = background, when ``background``: pairs with it are left out), and their
    affinities (uint8 decoded to float32)."""
    shape = local.shape
    source, target, values = [], [], []
    for o, s, size in zip(offset, inner, shape):
        start, stop = max(s.start, -o), min(s.stop, size - o)
        source.append(slice(start, max(start, stop)))
        target.append(slice(start + o, max(start, stop) + o))
        values.append(slice(start - s.start, max(start, stop) - s.start))
    u = local[tuple(source)]
    v = local[tuple(target)]
    keep = u != v
    if background:
        keep &= u != 0
        keep &= v != 0
    u, v = u[keep].astype(np.int64), v[keep].astype(np.int64)
    pairs = affinities[tuple(values)][keep]
    return np.minimum(u, v) * n + np.maximum(u, v), decode_probabilities(pairs) if pairs.dtype == np.uint8 else pairs


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
        affinities: (C, z, y, x) of the block only (``fragments[inner]``): float in [0, 1], or uint8
            round(255 a) as stored (decoded pair by pair, to the same values as the whole block).
        offsets: C offsets, nearest-neighbour first.
        inner: the block's slices inside ``fragments``.
        mws_weights: ``affinities`` holds the mutex watershed's edge weights instead
            (:func:`melecole.segmentation.mws.mws_weights`: 1 - a on long-range channels); the statistics
            are of the affinities either way.
    """
    # Local ids 1..n-1 in the smallest dtype (0 stays background): the pair masks below touch every
    # voxel 12 times, so a uint16 / uint32 array moves 4 / 2x less memory than the uint64 ids.
    local, mapping = fastremap.renumber(np.asarray(fragments), preserve_zero=True)
    n = len(mapping) + (0 not in mapping)
    global_ids = np.zeros(n, np.uint64)
    global_ids[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(mapping, np.uint64, len(mapping))
    num_attractive = number_of_attractive_channels(offsets)
    keys: list[list[np.ndarray]] = [[], []]
    values: list[list[np.ndarray]] = [[], []]
    for channel, offset in enumerate(offsets):
        kind = 0 if channel < num_attractive else 1
        key, value = _pair_keys(local, affinities[channel], [int(o) for o in offset], inner, n, 0 in mapping)
        keys[kind].append(key)
        value = value.astype(np.float64)
        values[kind].append(1.0 - value if kind == 1 and mws_weights else value)
    flat_keys = [np.concatenate(k) if k else np.zeros(0, np.int64) for k in keys]
    flat_values = [np.concatenate(v) if v else np.zeros(0) for v in values]
    dense = n * n <= DENSE_KEYS
    if dense:
        # Few fragments: count straight into the n * n key space (no sort). Sums add the same values
        # in the same order as the sorted path, so both give identical floats.
        where, size = flat_keys, n * n
    else:
        unique = np.unique(np.concatenate(flat_keys))
        where, size = [np.searchsorted(unique, k) for k in flat_keys], len(unique)
    stats = [
        column for w, value in zip(where, flat_values)
        for column in (np.bincount(w, weights=value, minlength=size), np.bincount(w, minlength=size).astype(np.int64))
    ]
    if dense:
        unique = np.flatnonzero(stats[1] + stats[3])
        stats = [stat[unique] for stat in stats]
    if len(unique) == 0:
        return RegionGraph.empty()
    first, second = global_ids[unique // n], global_ids[unique % n]
    u, v = np.minimum(first, second), np.maximum(first, second)
    order = np.lexsort((v, u))  # local ids follow first appearance: sort by global (u, v)
    return RegionGraph(u[order], v[order], *(stat[order] for stat in stats))


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
