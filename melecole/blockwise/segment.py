"""The blockwise algorithm on in-memory arrays: the same block functions as the dask runner.

``segment_blockwise_in_memory(affinities, options)`` with a block shape covering the volume is the
whole-volume fragment-graph segmentation (one block) that ``infer.py`` can use; with smaller blocks
it reproduces, in one process, exactly what ``python -m melecole.blockwise`` writes.
"""

from __future__ import annotations

import numpy as np

from melecole.blockwise.plan import BlockPlan, BlockwiseOptions
from melecole.io.codec import decode_probabilities
from melecole.segmentation.agglomeration import LookupTable, agglomerate
from melecole.segmentation.fragments import block_fragments, global_fragment_ids
from melecole.segmentation.postprocess import fill_heightmap
from melecole.segmentation.region_graph import RegionGraph, block_region_graph, fragment_sizes, reduce_graphs
from melecole.segmentation.relabel import relabel_block

__all__ = [
    "segment_blockwise_in_memory",
    "fragments_in_memory",
    "graphs_in_memory",
    "fragments_of_block",
    "graph_of_block",
    "agglomerate_blocks",
]


def fragments_of_block(
    affinities: np.ndarray, foreground: np.ndarray | None, inner: tuple, index: int, plan: BlockPlan,
    options: BlockwiseOptions,
) -> np.ndarray:
    """Global fragment ids (uint64, block shape) of block ``index`` from its padded inputs (all channels,
    or only the first ``options.fragment_channels``: the others are not used)."""
    channels = options.fragment_channels
    segmentation = options.segmentation
    local = block_fragments(
        decode_probabilities(affinities[:channels]),
        options.offsets[:channels],
        inner,
        mode=segmentation.fragments,
        foreground=None if foreground is None else decode_probabilities(foreground),
        background_threshold=segmentation.background,
        params=dict(segmentation.fragment_params),
        min_size=segmentation.min_fragment_size,
    )
    return global_fragment_ids(local, index, plan.block_voxels)


def graph_of_block(
    fragments: np.ndarray, affinities: np.ndarray, inner: tuple, options: BlockwiseOptions
) -> tuple[RegionGraph, np.ndarray, np.ndarray]:
    """(edges, fragment ids, fragment sizes) of one block: fragments padded by the reach, block affinities
    (stored values: uint8 or float)."""
    graph = block_region_graph(fragments, affinities, options.offsets, inner)
    ids, sizes = fragment_sizes(fragments[tuple(inner)])
    return graph, ids, sizes


def agglomerate_blocks(
    graphs: list[RegionGraph], ids: list[np.ndarray], sizes: list[np.ndarray], options: BlockwiseOptions
) -> tuple[LookupTable, int]:
    """Every block's edges and fragment sizes (in block order) -> (lookup table, number of edges).

    Empties ``graphs`` once they are reduced (the reduced graph takes their place in memory)."""
    graph = reduce_graphs(graphs)
    graphs.clear()
    segmentation = options.segmentation
    table = agglomerate(
        graph, np.concatenate(ids), np.concatenate(sizes), mode=segmentation.agglomeration,
        threshold=segmentation.agglomeration_threshold, min_size=segmentation.min_segment_size,
    )
    return table, len(graph)


def fragments_in_memory(
    affinities: np.ndarray, foreground: np.ndarray | None, plan: BlockPlan, options: BlockwiseOptions
) -> np.ndarray:
    """The fragments pass over every block of in-memory arrays: uint64 (Z, Y, X) global fragment ids."""
    fragments = np.zeros(plan.shape, dtype=np.uint64)
    for index in range(plan.num_blocks):
        outer, inner = plan.padded(index, options.halo)
        fragments[plan.box(index)] = fragments_of_block(
            affinities[(slice(None),) + outer], None if foreground is None else foreground[outer],
            inner, index, plan, options,
        )
    return fragments


def graphs_in_memory(
    fragments: np.ndarray, affinities: np.ndarray, plan: BlockPlan, options: BlockwiseOptions
) -> tuple[list[RegionGraph], list[np.ndarray], list[np.ndarray]]:
    """The graph pass over every block: (edges, fragment ids, fragment sizes) per block, in block order."""
    graphs, ids, sizes = [], [], []
    for index in range(plan.num_blocks):
        outer, inner = plan.padded(index, options.reach)
        graph, block_ids, block_sizes = graph_of_block(
            fragments[outer], affinities[(slice(None),) + plan.box(index)], inner, options
        )
        graphs.append(graph)
        ids.append(block_ids)
        sizes.append(block_sizes)
    return graphs, ids, sizes


def segment_blockwise_in_memory(
    affinities: np.ndarray, options: BlockwiseOptions, foreground: np.ndarray | None = None
) -> tuple[np.ndarray, LookupTable]:
    """Fragments per block, region graph, agglomeration, relabel: all in memory.

    Args:
        affinities: (C, Z, Y, X) float in [0, 1] or uint8 (round(255 a)).
        options: offsets, block shape (>= the volume: one block), modes, thresholds.
        foreground: optional (Z, Y, X) foreground probability.

    Returns:
        (uint64 (Z, Y, X) segmentation, the fragment -> segment lookup table).
    """
    if affinities.ndim != 4 or affinities.shape[0] != len(options.offsets):
        raise ValueError(f"affinities must be (C, Z, Y, X) with C = {len(options.offsets)}, got {affinities.shape}")
    shape = affinities.shape[1:]
    plan = BlockPlan(tuple(shape), options.block_shape)  # type: ignore[arg-type]
    fragments = fragments_in_memory(affinities, foreground, plan, options)
    graphs, ids, sizes = graphs_in_memory(fragments, affinities, plan, options)
    table, _ = agglomerate_blocks(graphs, ids, sizes, options)
    fill = options.segmentation.fill_background
    segmentation = np.zeros(shape, dtype=np.uint64)
    for index in range(plan.num_blocks):
        outer, inner = plan.padded(index, options.fill_halo if fill else (0, 0, 0))
        block_foreground = foreground[outer] if foreground is not None and fill else None
        heightmap = block_fill_heightmap(block_foreground, options)
        segmentation[plan.box(index)] = relabel_block(fragments[outer], table, inner, fill=fill, heightmap=heightmap)
    return segmentation, table


def block_fill_heightmap(foreground: np.ndarray | None, options: BlockwiseOptions) -> np.ndarray | None:
    """The fill's height map of a padded block from its stored foreground (float or uint8), or None."""
    if foreground is None or options.segmentation.fill_mode == "nearest":
        return None
    if foreground.dtype == np.uint8:
        foreground = decode_probabilities(foreground)
    return fill_heightmap(foreground, options.segmentation.fill_mode)
