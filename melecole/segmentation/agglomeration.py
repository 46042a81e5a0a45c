"""Global agglomeration of the fragment graph -> a fragment -> segment lookup table (numpy only).

Modes (entries of :data:`AGGLOMERATION_MODES`; a new one is a function and one line there):

- ``mws``: graph mutex watershed. Each pair with nearest-neighbour contacts is an attractive edge
  weighted by its mean nearest-neighbour affinity; each pair with long-range contacts is a mutex edge
  weighted by 1 - its mean long-range affinity. Like the voxel MWS, all edges are processed in one
  pass, strongest first (bioimage-cpp's ``mutex_watershed_clustering``).
- ``mean``: merge every pair whose mean nearest-neighbour affinity exceeds ``threshold``
  (connected components of those edges, one shot: scores are not recomputed after a merge).

Hierarchical modes (bioimage-cpp ``graph.agglomeration`` / ``graph.multicut``): the graph is the
region adjacency graph (pairs with nearest-neighbour contacts; pairs that only have long-range
contacts are left out, so a segment is always connected), and after each merge the score of every
edge of the merged segment is recomputed from the merged statistics.

- ``gasp_average``: GASP with average (mean) linkage on signed weights ``a - threshold``, where ``a``
  is a pair's mean nearest-neighbour affinity, weighted by its contact count. After a merge, the
  parallel edges combine to ``(sum of affinities) / (number of contacts) - threshold`` of the two
  segments, exactly; the strongest positive edge merges next, and merging stops when none is positive.
  Merge heights never increase (average linkage has no reversals), so a higher threshold cuts the
  same merge tree earlier: never fewer segments.
- ``gasp_signed``: GASP average linkage on the signed graph of Bailoni et al. (2022): every contact,
  nearest-neighbour and long-range alike, votes ``a - threshold``; a pair's weight is the mean vote
  over all its contacts (weighted by their number), recomputed exactly after each merge. Long-range
  contacts thus push apart two segments whose distant parts disagree, the evidence that
  ``gasp_average`` ignores (aimed at the giant merges of thin processes). Pairs without
  nearest-neighbour contacts enter only with a negative weight (they can repel, never join on their
  own), so a segment is still always connected.
- ``mala_median``: MALA-style median linkage (bioimage-cpp ``MalaClusterPolicy``, 256 histogram
  bins): the pair with the highest median affinity merges next while that median exceeds
  ``threshold``. The median is over the merged fragment pairs' mean affinities, each fragment pair
  counting once (the region graph keeps sums, not per-contact histograms as waterz does). Also one
  merge tree cut at ``threshold``.
- ``multicut``: the multicut of the region adjacency graph with costs
  ``(logit(a) - logit(threshold)) * contacts`` (positive: join), solved by greedy additive edge
  contraction then Kernighan-Lin (deterministic). A higher threshold cuts more, but the solver is a
  heuristic, so the number of segments is not guaranteed monotone in it.

Segment ids are consecutive from 1 in the order of each segment's smallest fragment id, so the table
depends only on the graph, never on the order blocks were processed in. Segments smaller than
``min_size`` voxels (sizes summed over their fragments) map to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from melecole.segmentation.region_graph import RegionGraph

__all__ = [
    "AGGLOMERATION_MODES",
    "AgglomerationMode",
    "LookupTable",
    "agglomerate",
    "agglomeration_mode",
    "gasp_average_clustering",
    "gasp_signed_clustering",
    "graph_mutex_watershed",
    "mala_median_clustering",
    "mean_affinity_clustering",
    "multicut_clustering",
]


@dataclass
class LookupTable:
    """Fragment id -> segment id.

    Attributes:
        fragments: (N,) uint64 sorted fragment ids.
        segments: (N,) uint64 segment ids (0 = dropped: smaller than the minimum size).
    """

    fragments: np.ndarray
    segments: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(self.segments.max()) if len(self.segments) else 0

    def save(self, path: str | Path) -> None:
        np.savez(path, fragments=self.fragments, segments=self.segments)

    @classmethod
    def load(cls, path: str | Path) -> LookupTable:
        with np.load(path) as data:
            return cls(data["fragments"], data["segments"])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Segment ids of fragment ``ids`` (any shape); 0 and unknown ids map to 0."""
        ids = np.asarray(ids, dtype=np.uint64)
        where = np.clip(np.searchsorted(self.fragments, ids), 0, max(len(self.fragments) - 1, 0))
        if not len(self.fragments):
            return np.zeros_like(ids)
        found = self.fragments[where] == ids
        return np.where(found & (ids != 0), self.segments[where], np.uint64(0))

    def apply(self, fragments: np.ndarray) -> np.ndarray:
        """uint64 segment ids of a fragment array (any shape): each fragment's segment, 0 for 0,
        dropped and unknown fragments."""
        import fastremap

        ids = fastremap.unique(fragments)
        mapping = {int(i): int(s) for i, s in zip(ids, self.lookup(ids))}
        return fastremap.remap(np.ascontiguousarray(fragments, dtype=np.uint64), mapping).astype(np.uint64, copy=False)


def _node_index(graph: RegionGraph, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.searchsorted(nodes, graph.u), np.searchsorted(nodes, graph.v)


def graph_mutex_watershed(graph: RegionGraph, nodes: np.ndarray) -> np.ndarray:
    """Graph MWS: (N,) int64 cluster index per node of ``nodes`` (sorted ids)."""
    from bioimage_cpp.graph import UndirectedGraph
    from bioimage_cpp.graph.mutex_watershed import mutex_watershed_clustering

    u, v = _node_index(graph, nodes)
    attractive = graph.attractive_count > 0
    repulsive = graph.long_range_count > 0
    costs = graph.attractive_sum[attractive] / graph.attractive_count[attractive]
    mutex_costs = 1.0 - graph.long_range_sum[repulsive] / graph.long_range_count[repulsive]
    network = UndirectedGraph(len(nodes))
    network.insert_edges(np.stack([u[attractive], v[attractive]], axis=1).astype(np.uint64))
    mutex = np.stack([u[repulsive], v[repulsive]], axis=1).astype(np.uint64)
    labels = mutex_watershed_clustering(network, costs.astype(np.float64), mutex, mutex_costs.astype(np.float64))
    return labels.astype(np.int64)


def mean_affinity_clustering(graph: RegionGraph, nodes: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the edges with mean nearest-neighbour affinity > ``threshold``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    u, v = _node_index(graph, nodes)
    mean = graph.attractive_sum / np.maximum(graph.attractive_count, 1)
    keep = (graph.attractive_count > 0) & (mean > threshold)
    matrix = coo_matrix((np.ones(int(keep.sum())), (u[keep], v[keep])), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(matrix, directed=False)
    return labels.astype(np.int64)


def _adjacency(graph: RegionGraph, nodes: np.ndarray) -> tuple[object, np.ndarray, np.ndarray]:
    """(bioimage-cpp graph of the pairs with nearest-neighbour contacts, their mean nearest-neighbour
    affinity, their contact count); edge i of the graph is the i-th such pair (u < v, sorted)."""
    from bioimage_cpp.graph import UndirectedGraph

    u, v = _node_index(graph, nodes)
    adjacent = graph.attractive_count > 0
    counts = graph.attractive_count[adjacent].astype(np.float64)
    means = graph.attractive_sum[adjacent] / counts
    network = UndirectedGraph(len(nodes))
    network.insert_edges(np.stack([u[adjacent], v[adjacent]], axis=1).astype(np.uint64))
    return network, means, counts


def _singletons(nodes: np.ndarray) -> np.ndarray:
    return np.arange(len(nodes), dtype=np.int64)


def gasp_average_clustering(graph: RegionGraph, nodes: np.ndarray, threshold: float) -> np.ndarray:
    """GASP average linkage on ``mean affinity - threshold`` weighted by contacts (module docstring)."""
    from bioimage_cpp.graph.agglomeration import GaspClusterPolicy

    network, means, counts = _adjacency(graph, nodes)
    if not len(means):
        return _singletons(nodes)
    labels = GaspClusterPolicy(linkage="mean").optimize(network, means - float(threshold), edge_sizes=counts)
    return np.asarray(labels, dtype=np.int64)


def gasp_signed_clustering(graph: RegionGraph, nodes: np.ndarray, threshold: float) -> np.ndarray:
    """GASP average linkage on the signed votes of all contacts, long-range ones included (module docstring)."""
    from bioimage_cpp.graph import UndirectedGraph
    from bioimage_cpp.graph.agglomeration import GaspClusterPolicy

    u, v = _node_index(graph, nodes)
    counts = (graph.attractive_count + graph.long_range_count).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        votes = (graph.attractive_sum + graph.long_range_sum) / counts - float(threshold)
    keep = (counts > 0) & ((graph.attractive_count > 0) | (votes < 0))
    if not keep.any():
        return _singletons(nodes)
    network = UndirectedGraph(len(nodes))
    network.insert_edges(np.stack([u[keep], v[keep]], axis=1).astype(np.uint64))
    labels = GaspClusterPolicy(linkage="mean").optimize(network, votes[keep], edge_sizes=counts[keep])
    return np.asarray(labels, dtype=np.int64)


MALA_BINS = 256


def mala_median_clustering(graph: RegionGraph, nodes: np.ndarray, threshold: float) -> np.ndarray:
    """MALA median linkage: merge while the highest median affinity exceeds ``threshold`` (module docstring)."""
    from bioimage_cpp.graph.agglomeration import MalaClusterPolicy

    network, means, _ = _adjacency(graph, nodes)
    if not len(means):
        return _singletons(nodes)
    # The policy merges the lowest boundary indicator first and stops when it reaches its threshold.
    policy = MalaClusterPolicy(num_bins=MALA_BINS, num_clusters_stop=0, threshold=1.0 - float(threshold))
    return np.asarray(policy.optimize(network, 1.0 - means), dtype=np.int64)


# Affinities and thresholds are clipped to [eps, 1 - eps] before the log-odds (finite costs).
MULTICUT_EPSILON = 1e-6


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, MULTICUT_EPSILON, 1.0 - MULTICUT_EPSILON)
    return np.log(p) - np.log1p(-p)


def multicut_clustering(graph: RegionGraph, nodes: np.ndarray, threshold: float) -> np.ndarray:
    """Multicut (greedy additive + Kernighan-Lin) with costs (logit(a) - logit(threshold)) * contacts."""
    from bioimage_cpp.graph.multicut import KernighanLinMulticut, MulticutObjective

    network, means, counts = _adjacency(graph, nodes)
    if not len(means):
        return _singletons(nodes)
    costs = (_logit(means) - _logit(float(threshold))) * counts
    labels = KernighanLinMulticut().optimize(MulticutObjective(network, costs))
    return np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class AgglomerationMode:
    """An entry of :data:`AGGLOMERATION_MODES`: ``function(graph, nodes, threshold)`` -> (N,) cluster per
    node (any integer numbering); ``uses_threshold``: whether ``threshold`` matters."""

    function: Callable[[RegionGraph, np.ndarray, float], np.ndarray]
    uses_threshold: bool = False


# Name -> mode: BLOCKWISE.AGGLOMERATION and INFERENCE.AGGLOMERATION (plus "none") read this table.
AGGLOMERATION_MODES: dict[str, AgglomerationMode] = {
    "mws": AgglomerationMode(lambda graph, nodes, _threshold: graph_mutex_watershed(graph, nodes)),
    "mean": AgglomerationMode(mean_affinity_clustering, uses_threshold=True),
    "gasp_average": AgglomerationMode(gasp_average_clustering, uses_threshold=True),
    "gasp_signed": AgglomerationMode(gasp_signed_clustering, uses_threshold=True),
    "mala_median": AgglomerationMode(mala_median_clustering, uses_threshold=True),
    "multicut": AgglomerationMode(multicut_clustering, uses_threshold=True),
}


def agglomeration_mode(name: str) -> AgglomerationMode:
    """The registered mode ``name``; ValueError listing the choices otherwise."""
    if name not in AGGLOMERATION_MODES:
        raise ValueError(f"agglomeration mode '{name}', expected one of {', '.join(AGGLOMERATION_MODES)}")
    return AGGLOMERATION_MODES[name]


def agglomerate(
    graph: RegionGraph,
    nodes: np.ndarray,
    sizes: np.ndarray,
    *,
    mode: str = "mws",
    threshold: float = 0.5,
    min_size: int = 0,
) -> LookupTable:
    """Clusters the fragments and builds the lookup table.

    Args:
        graph: the reduced region graph (edges between ``nodes``).
        nodes: (N,) sorted unique fragment ids (every fragment, also those without edges).
        sizes: (N,) voxel count per fragment.
        mode: a name of :data:`AGGLOMERATION_MODES`.
        threshold: for the modes that take one (all but ``mws``).
        min_size: segments with fewer voxels map to 0.
    """
    nodes = np.asarray(nodes, dtype=np.uint64)
    if len(nodes) == 0:
        return LookupTable(nodes, nodes.copy())
    clusters = agglomeration_mode(mode).function(graph, nodes, threshold)
    # Renumber clusters by their first (smallest-id) node: independent of the engine's numbering.
    _, first = np.unique(clusters, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    clusters = rank[np.unique(clusters, return_inverse=True)[1]]
    segment_sizes = np.bincount(clusters, weights=np.asarray(sizes, dtype=np.float64))
    keep = segment_sizes >= max(int(min_size), 1)
    new_ids = np.where(keep, np.cumsum(keep), 0).astype(np.uint64)
    return LookupTable(nodes, new_ids[clusters])
