"""Blockwise segmentation numerics on hand-built and tiny volumes (no dask)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import noisy_affinities, voronoi_labels

from melecole.blockwise.plan import BlockPlan, build_options
from melecole.blockwise.segment import fragments_of_block, segment_blockwise_in_memory
from melecole.errors import ConfigError
from melecole.evaluation import evaluate_segmentation
from melecole.inference.affinities import affinities_from_labels
from melecole.io.codec import decode_probabilities
from melecole.segmentation.agglomeration import LookupTable, agglomerate, graph_mutex_watershed
from melecole.segmentation.fragments import block_fragments, drop_small_fragments, global_fragment_ids
from melecole.segmentation.mws import mutex_watershed
from melecole.segmentation.postprocess import postprocess_segmentation
from melecole.segmentation.region_graph import RegionGraph, block_region_graph, reduce_graphs
from melecole.segmentation.relabel import relabel_block

NEAREST = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are equal up to renumbering (a bijection between their ids)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_global_fragment_ids_are_unique_across_blocks():
    plan = BlockPlan((4, 6, 6), (2, 3, 3))
    local = np.array([[0, 1], [2, 27]], dtype=np.uint64)  # 27 = a block's largest possible local id? no: 18
    ids = [global_fragment_ids(np.minimum(local, plan.block_voxels), b, plan.block_voxels) for b in range(8)]
    assert all(i[0, 0] == 0 for i in ids)  # background stays 0
    ranges = [(i[i > 0].min(), i.max()) for i in ids]
    assert all(high < low for (_, high), (low, _) in zip(ranges, ranges[1:]))  # disjoint, increasing


def test_region_graph_sums_and_counts_by_kind():
    # 1 x 1 x 4 voxels: fragments 5 5 | 9 9, offsets: nearest (x) and long range (x - 2).
    fragments = np.array([[[5, 5, 9, 9]]], dtype=np.uint64)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, -2]]
    affinities = np.zeros((4, 1, 1, 4), dtype=np.float32)
    affinities[2, 0, 0] = [0.0, 0.9, 0.2, 0.8]  # pair (x-1, x): only x=2 crosses 5|9 -> 0.2
    affinities[3, 0, 0] = [0.0, 0.0, 0.3, 0.5]  # pairs (0,2) and (1,3) cross -> 0.3 + 0.5
    graph = block_region_graph(fragments, affinities, offsets, (slice(0, 1), slice(0, 1), slice(0, 4)))
    assert graph.u.tolist() == [5] and graph.v.tolist() == [9]
    assert graph.attractive_sum[0] == pytest.approx(0.2) and graph.attractive_count.tolist() == [1]
    assert graph.long_range_sum[0] == pytest.approx(0.8) and graph.long_range_count.tolist() == [2]


def test_region_graph_across_block_faces_equals_one_block():
    rng = np.random.default_rng(1)
    labels = voronoi_labels((8, 20, 20), seeds=12, seed=3).astype(np.uint64) * 7
    offsets = NEAREST + [[-2, 0, 0], [0, -5, 0], [1, 0, -5], [0, 3, 4]]
    affinities = rng.random((len(offsets),) + labels.shape).astype(np.float32)
    whole = block_region_graph(labels, affinities, offsets, (slice(0, 8), slice(0, 20), slice(0, 20)))
    plan = BlockPlan(labels.shape, (4, 8, 12))
    parts = []
    for index in range(plan.num_blocks):
        outer, inner = plan.padded(index, (2, 5, 5))
        parts.append(block_region_graph(labels[outer], affinities[(slice(None),) + plan.box(index)], offsets, inner))
    reduced = reduce_graphs(parts)
    assert len(whole) > 20 and len(reduced) == len(whole)
    for name in ("u", "v", "attractive_count", "long_range_count"):
        np.testing.assert_array_equal(getattr(reduced, name), getattr(whole, name))
    np.testing.assert_allclose(reduced.attractive_sum, whole.attractive_sum, rtol=1e-12)
    np.testing.assert_allclose(reduced.long_range_sum, whole.long_range_sum, rtol=1e-12)


def _same_graph(a: RegionGraph, b: RegionGraph) -> None:
    for name in ("u", "v", "attractive_sum", "attractive_count", "long_range_sum", "long_range_count"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_region_graph_of_stored_uint8_and_both_counting_paths_agree(monkeypatch):
    import melecole.segmentation.region_graph as region_graph

    rng = np.random.default_rng(4)
    # Ids out of order and far apart (local ids follow first appearance), background 0 in places.
    labels = (voronoi_labels((8, 20, 20), seeds=15, seed=5).astype(np.uint64) * 1_000_003) % 7919
    labels[:, :3, :3] = 0
    offsets = NEAREST + [[-2, 0, 0], [0, -5, 0], [1, 0, -5]]
    stored = rng.integers(0, 256, (len(offsets), 6, 16, 14), dtype=np.uint8)
    inner = (slice(1, 7), slice(2, 18), slice(3, 17))
    dense = block_region_graph(labels, stored, offsets, inner)
    decoded = block_region_graph(labels, decode_probabilities(stored), offsets, inner)
    monkeypatch.setattr(region_graph, "DENSE_KEYS", 0)  # force the sorted path
    sorted_path = block_region_graph(labels, stored, offsets, inner)
    assert len(dense) > 20 and 0 not in dense.u
    assert np.all(dense.u < dense.v) and np.all(np.diff(dense.u.astype(np.int64)) >= 0)  # sorted by (u, v)
    assert dense.attractive_sum.dtype == np.float64 and dense.long_range_count.dtype == np.int64
    _same_graph(dense, decoded)
    _same_graph(dense, sorted_path)


def _graph(u, v, attractive, long_range) -> RegionGraph:
    count = lambda values: np.array([0 if a is None else 1 for a in values], dtype=np.int64)  # noqa: E731
    total = lambda values: np.array([0.0 if a is None else a for a in values])  # noqa: E731
    return RegionGraph(
        np.array(u, np.uint64), np.array(v, np.uint64), total(attractive), count(attractive),
        total(long_range), count(long_range),
    )


def test_graph_mutex_watershed_respects_stronger_mutex():
    # 1-2 attract strongly, 2-3 weakly; a mutex 1-3 (1 - 0.1 = 0.9) comes before 2-3 (0.4).
    graph = _graph([1, 2, 1], [2, 3, 3], [0.95, 0.4, None], [None, None, 0.1])
    table = agglomerate(graph, np.array([1, 2, 3, 4], np.uint64), np.ones(4), mode="mws")
    assert table.segments.tolist() == [1, 1, 2, 3]  # 4 has no edge: its own segment
    table = agglomerate(graph, np.array([1, 2, 3, 4], np.uint64), np.ones(4), mode="mean", threshold=0.3)
    assert table.segments.tolist() == [1, 1, 1, 2]  # mean mode ignores long-range evidence
    table = agglomerate(graph, np.array([1, 2, 3, 4], np.uint64), np.array([5, 5, 3, 1]), mode="mws", min_size=3)
    assert table.segments.tolist() == [1, 1, 2, 0]  # segment {4} (1 voxel) dropped


def test_graph_mutex_watershed_agrees_with_mwatershed():
    mwatershed = pytest.importorskip("mwatershed")
    rng = np.random.default_rng(0)
    n = 60
    u, v = rng.integers(0, n, 400), rng.integers(0, n, 400)
    keep = u < v
    pairs = np.unique(np.stack([u[keep], v[keep]], 1), axis=0)
    attractive = [a if rng.random() < 0.7 else None for a in rng.random(len(pairs))]
    long_range = [a if rng.random() < 0.5 else None for a in rng.random(len(pairs))]
    graph = _graph(pairs[:, 0], pairs[:, 1], attractive, long_range)
    nodes = np.arange(n, dtype=np.uint64)
    ours = graph_mutex_watershed(graph, nodes)
    edges = [(a, int(p), int(q)) for (p, q), a in zip(pairs, attractive) if a is not None]
    edges += [(-(1.0 - a), int(p), int(q)) for (p, q), a in zip(pairs, long_range) if a is not None]
    reference = dict(mwatershed.cluster_edges(edges))
    theirs = np.array([reference.get(i, -1 - i) for i in range(n)])
    assert same_partition(ours, theirs)
    assert 1 < len(np.unique(ours)) < n


def test_lookup_and_relabel_with_fill():
    table = LookupTable(np.array([3, 8, 9], np.uint64), np.array([1, 0, 2], np.uint64))
    fragments = np.array([[[3, 3, 0, 8, 9, 9]]], dtype=np.uint64)
    inner = (slice(0, 1), slice(0, 1), slice(1, 5))
    assert relabel_block(fragments, table, inner, fill=False).tolist() == [[[1, 0, 0, 2]]]
    filled = relabel_block(fragments, table, inner, fill=True)
    assert 0 not in filled and filled[0, 0, 0] == 1 and filled[0, 0, 3] == 2


def test_watershed_fragments_read_only_the_nearest_neighbour_channels(blockwise_cfg):
    labels = voronoi_labels()
    offsets = blockwise_cfg.INFERENCE.OFFSETS
    affinities = noisy_affinities(labels, offsets, noise=0.1)
    plan = BlockPlan(labels.shape, (8, 16, 16))
    options = {mode: build_options(blockwise_cfg, fragments=mode) for mode in ("mws", "watershed")}
    assert options["mws"].fragment_channels == len(offsets) > 3 == options["watershed"].fragment_channels
    outer, inner = plan.padded(5, options["watershed"].halo)
    block = affinities[(slice(None),) + outer]
    full = fragments_of_block(block, None, inner, 5, plan, options["watershed"])
    np.testing.assert_array_equal(fragments_of_block(block[:3], None, inner, 5, plan, options["watershed"]), full)
    assert full.shape == (8, 16, 16) and len(np.unique(full)) > 3


@pytest.mark.parametrize("mode", ["mws", "watershed"])
@pytest.mark.parametrize("block", [(16, 48, 48), (8, 16, 16)])
def test_perfect_affinities_give_the_labels(blockwise_cfg, mode, block):
    labels = voronoi_labels()
    affinities = affinities_from_labels(labels, blockwise_cfg.INFERENCE.OFFSETS)
    cfg = blockwise_cfg.clone()
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 0  # the labels hold a one-voxel object
    options = build_options(cfg, block_shape=block, fragments=mode)
    segmentation, table = segment_blockwise_in_memory(affinities, options)
    assert segmentation.dtype == np.uint64 and segmentation.shape == labels.shape
    assert same_partition(segmentation, labels)
    assert table.num_segments == len(np.unique(labels))


def test_blockwise_close_to_whole_volume_mws_and_deterministic(blockwise_cfg):
    labels = voronoi_labels()
    offsets = blockwise_cfg.INFERENCE.OFFSETS
    affinities = noisy_affinities(labels, offsets, noise=0.1)
    whole = postprocess_segmentation(mutex_watershed(affinities, offsets), min_size=10)
    result = evaluate_segmentation(whole, labels, top_k=0)
    reference = result.vi_split + result.vi_merge
    scores = {}
    for block in [(16, 48, 48), (8, 16, 16), (8, 32, 16)]:
        options = build_options(blockwise_cfg, block_shape=block)
        segmentation, _ = segment_blockwise_in_memory(affinities, options)
        again, _ = segment_blockwise_in_memory(affinities, options)
        np.testing.assert_array_equal(segmentation, again)
        result = evaluate_segmentation(segmentation, labels, top_k=0)
        scores[block] = result.vi_split + result.vi_merge
    assert reference < 0.6 and max(scores.values()) < reference + 0.2, (reference, scores)
    assert max(scores.values()) - min(scores.values()) < 0.15, scores


def test_options_validation(blockwise_cfg):
    with pytest.raises(ConfigError, match="not a multiple of the output chunks"):
        build_options(blockwise_cfg, block_shape=(8, 20, 16))
    cfg = blockwise_cfg.clone()
    cfg.BLOCKWISE.HALO = [1, 1, 1]
    with pytest.raises(ConfigError, match="BLOCKWISE.HALO"):
        build_options(cfg)
    cfg = blockwise_cfg.clone()
    cfg.BLOCKWISE.FRAGMENTS = "slic"
    with pytest.raises(ConfigError, match="BLOCKWISE.FRAGMENTS: 'slic'"):
        build_options(cfg)
    options = build_options(blockwise_cfg)
    assert options.reach == (2, 5, 5) and options.halo == (4, 10, 10) and options.segmentation.num_attractive == 3


def test_drop_small_fragments_sets_them_to_background():
    labels = np.zeros((5, 8, 10), np.uint64)
    labels[:, :, :5], labels[:, :, 5:] = 1, 2
    labels[2, 3:5, 2:4] = 3  # 4 voxels inside fragment 1
    labels[2, 3, 4:6] = 4  # 2 voxels between fragments 1 and 2
    labels[2, 6:8, 7:9] = 5  # 4 voxels touching the y face: kept
    labels[1:4, 1, 8] = 0  # background
    before = labels.copy()
    result = drop_small_fragments(labels, 5)
    np.testing.assert_array_equal(labels, before)  # input untouched
    small = (before == 3) | (before == 4)
    assert (result[small] == 0).all() and set(np.unique(result)) == {0, 1, 2, 5}
    np.testing.assert_array_equal(result[~small], before[~small])
    assert (drop_small_fragments(labels, 3) != before).sum() == 2  # only the 2-voxel fragment
    assert drop_small_fragments(labels, 1) is labels and drop_small_fragments(labels, 0) is labels


def test_min_fragment_size_option(blockwise_cfg):
    cfg = blockwise_cfg.clone()
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 25
    assert build_options(cfg, fragments="mws").segmentation.min_fragment_size == 25  # auto: voxel-MWS segments
    assert build_options(cfg, fragments="watershed").segmentation.min_fragment_size == 0
    cfg.BLOCKWISE.MIN_FRAGMENT_SIZE = 7
    assert build_options(cfg, fragments="watershed").segmentation.min_fragment_size == 7
    cfg.BLOCKWISE.MIN_FRAGMENT_SIZE = -2
    with pytest.raises(ConfigError, match="BLOCKWISE.MIN_FRAGMENT_SIZE: -2, expected -1"):
        build_options(cfg)


def test_block_fragments_crop_and_renumber(blockwise_cfg):
    labels = voronoi_labels((8, 16, 16), seeds=6)
    offsets = blockwise_cfg.INFERENCE.OFFSETS
    affinities = affinities_from_labels(labels, offsets)
    inner = (slice(2, 6), slice(4, 12), slice(0, 16))
    fragments = block_fragments(affinities, offsets, inner, mode="mws")
    assert fragments.shape == (4, 8, 16)
    assert np.array_equal(np.unique(fragments), np.arange(1, fragments.max() + 1))
    assert same_partition(fragments, labels[inner])


@pytest.mark.parametrize("mode, power", [("mws", 0.0), ("mean", 0.0), ("mean", 3.0)])
def test_infer_agglomeration_equals_blockwise_mws_fragments_on_one_block(blockwise_cfg, mode, power):
    """INFERENCE.AGGLOMERATION in the whole-volume pipeline is the blockwise algorithm (mws fragments)
    on one block: the same partition, and it merges the noisy voxel MWS's pieces; with
    INFERENCE.MWS_FOREGROUND_POWER both schedules weight the voxel MWS by the same foreground."""
    from melecole.inference.pipeline import segment_affinities as pipeline_segment
    from melecole.segmentation.options import build_segmentation_options

    labels = voronoi_labels()
    affinities = noisy_affinities(labels, blockwise_cfg.INFERENCE.OFFSETS, noise=0.2)
    foreground = np.random.default_rng(1).uniform(0.6, 1.0, labels.shape).astype(np.float32)
    cfg = blockwise_cfg.clone()
    cfg.INFERENCE.MWS_FOREGROUND_POWER = power
    cfg.INFERENCE.AGGLOMERATION, cfg.INFERENCE.AGGLOMERATION_THRESHOLD = mode, 0.6
    cfg.BLOCKWISE.AGGLOMERATION, cfg.BLOCKWISE.THRESHOLD = mode, 0.6
    cfg.BLOCKWISE.MIN_FRAGMENT_SIZE = 0  # every voxel-MWS segment a node, as in the pipeline
    segmented = pipeline_segment(affinities, foreground, build_segmentation_options(cfg, "volume"))
    merged, attrs = segmented["segmentation"]
    assert attrs["agglomeration"] == mode and attrs["foreground_power"] == power
    options = build_options(cfg, block_shape=labels.shape, fragments="mws")
    expected, _ = segment_blockwise_in_memory(affinities, options, foreground)
    assert same_partition(merged, expected)
    cfg.INFERENCE.AGGLOMERATION = "none"
    plain, _ = pipeline_segment(affinities, foreground, build_segmentation_options(cfg, "volume"))["segmentation"]
    assert len(np.unique(merged)) < len(np.unique(plain))
