"""The agglomeration modes on tiny hand-built region graphs: what each merges, threshold monotonicity,
determinism, and that every mode is selectable by INFERENCE.AGGLOMERATION and BLOCKWISE.AGGLOMERATION."""

from __future__ import annotations

import numpy as np
import pytest

from melecole.config import get_default_cfg
from melecole.config.validate import _CHOICES
from melecole.errors import ConfigError
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES, agglomerate
from melecole.segmentation.options import build_segmentation_options
from melecole.segmentation.region_graph import RegionGraph

HIERARCHICAL = ("gasp_average", "gasp_signed", "mala_median", "multicut")
THRESHOLD_MODES = ("mean", "gasp_average", "gasp_signed", "mala_median", "multicut")


Row = tuple[int, int, float, int]


def make_graph(edges: list[Row], repulsive: list[Row] = ()) -> RegionGraph:
    """A region graph from (u, v, mean nearest-neighbour affinity, contacts) and (u, v, mean long-range
    affinity, contacts) rows."""
    rows: dict[tuple[int, int], list[float]] = {}
    for u, v, affinity, count in edges:
        rows.setdefault((min(u, v), max(u, v)), [0.0, 0, 0.0, 0])[:2] = [affinity * count, count]
    for u, v, affinity, count in repulsive:
        rows.setdefault((min(u, v), max(u, v)), [0.0, 0, 0.0, 0])[2:] = [affinity * count, count]
    keys = sorted(rows)
    column = lambda i, dtype: np.array([rows[k][i] for k in keys], dtype=dtype)  # noqa: E731
    return RegionGraph(
        np.array([k[0] for k in keys], np.uint64), np.array([k[1] for k in keys], np.uint64),
        column(0, np.float64), column(1, np.int64), column(2, np.float64), column(3, np.int64),
    )


def segments(graph: RegionGraph, n: int, mode: str, threshold: float = 0.5, sizes=None) -> list[int]:
    nodes = np.arange(1, n + 1, dtype=np.uint64)
    sizes = np.ones(n) if sizes is None else np.asarray(sizes)
    return agglomerate(graph, nodes, sizes, mode=mode, threshold=threshold).segments.tolist()


# Fragments 1, 2, 3 (one object) and 4, 5 (another): strong inside, weak between, and the long-range
# affinities between the objects are low (what the graph mutex watershed repels on).
TWO_GROUPS = make_graph(
    [(1, 2, 0.9, 10), (1, 3, 0.85, 5), (2, 3, 0.95, 8), (3, 4, 0.1, 20), (4, 5, 0.9, 7), (2, 5, 0.2, 3)],
    repulsive=[(1, 4, 0.05, 12), (2, 4, 0.1, 6), (3, 5, 0.1, 9), (1, 2, 0.9, 4)],
)


@pytest.mark.parametrize("mode", tuple(AGGLOMERATION_MODES))
def test_every_mode_finds_two_groups_joined_by_weak_edges(mode):
    assert segments(TWO_GROUPS, 5, mode) == [1, 1, 1, 2, 2]


@pytest.mark.parametrize("mode", THRESHOLD_MODES)
def test_threshold_extremes(mode):
    assert segments(TWO_GROUPS, 5, mode, threshold=0.05) == [1, 1, 1, 1, 1]  # every edge is above it
    assert segments(TWO_GROUPS, 5, mode, threshold=0.97) == [1, 2, 3, 4, 5]  # none is


def test_hierarchical_modes_recompute_scores_after_a_merge():
    """1-2 strong; 2-3 above the threshold on 1 contact; 1-3 weak on 10 contacts. One-shot ``mean``
    chains all three; after 1 and 2 merge, {1, 2}-3 has mean affinity (0.6 + 10 * 0.1) / 11 = 0.145,
    so the hierarchical modes keep 3 apart."""
    graph = make_graph([(1, 2, 0.9, 5), (2, 3, 0.6, 1), (1, 3, 0.1, 10)])
    assert segments(graph, 3, "mean") == [1, 1, 1]
    for mode in ("gasp_average", "multicut"):
        assert segments(graph, 3, mode) == [1, 1, 2], mode


def test_average_linkage_weights_contacts_and_median_counts_pairs():
    """{1, 2} joins 3 over three fragment pairs with mean affinities 0.9, 0.8 (1 contact each) and 0.2
    (100 contacts). Average linkage: (0.9 + 0.8 + 20) / 102 = 0.21 < 0.5, apart; the MALA median of
    (0.9, 0.8, 0.2) is 0.8 > 0.5, merged."""
    graph = make_graph([(1, 2, 0.99, 5), (3, 4, 0.99, 5), (1, 3, 0.9, 1), (2, 3, 0.8, 1), (2, 4, 0.2, 100)])
    assert segments(graph, 4, "gasp_average") == [1, 1, 2, 2]
    assert segments(graph, 4, "mala_median") == [1, 1, 1, 1]


def test_multicut_cuts_a_cycle_through_its_costliest_repulsion():
    """Triangle: 1-2 and 2-3 attract, 1-3 repels on many contacts: the multicut separates 1 from 3, and
    2 joins the side with the stronger attraction."""
    graph = make_graph([(1, 2, 0.95, 3), (2, 3, 0.7, 3), (1, 3, 0.01, 50)])
    assert segments(graph, 3, "multicut") == [1, 1, 2]
    assert segments(graph, 3, "mean") == [1, 1, 1]


def random_graph(seed: int, n: int = 60) -> RegionGraph:
    """A random sparse graph on fragments 1..n: a chain (connected) plus random pairs."""
    rng = np.random.default_rng(seed)
    pairs = {(i, i + 1) for i in range(1, n)} | {
        tuple(sorted(rng.choice(np.arange(1, n + 1), 2, replace=False).tolist())) for _ in range(2 * n)
    }
    return make_graph([(u, v, float(rng.uniform(0, 1)), int(rng.integers(1, 30))) for u, v in sorted(pairs)])


def nested(fine: list[int], coarse: list[int]) -> bool:
    """Every segment of ``fine`` lies inside one segment of ``coarse``."""
    return all(len({c for f2, c in zip(fine, coarse) if f2 == f}) == 1 for f in set(fine))


@pytest.mark.parametrize("mode", ("mean", "gasp_average", "gasp_signed", "mala_median"))
@pytest.mark.parametrize("seed", (0, 1))
def test_a_higher_threshold_never_gives_fewer_segments(mode, seed):
    """For these modes one merge order is cut at the threshold: the partitions are nested."""
    graph = random_graph(seed)
    results = [segments(graph, 60, mode, threshold=t) for t in np.linspace(0.0, 1.0, 21)]
    counts = [max(r) for r in results]
    assert counts == sorted(counts) and counts[0] < 10 and counts[-1] == 60, counts
    for coarse, fine in zip(results, results[1:]):
        assert nested(fine, coarse)


@pytest.mark.parametrize("mode", tuple(AGGLOMERATION_MODES))
def test_modes_are_deterministic(mode):
    graph = random_graph(2)
    first = segments(graph, 60, mode, threshold=0.55)
    assert all(segments(random_graph(2), 60, mode, threshold=0.55) == first for _ in range(3))
    assert 1 < max(first) < 60 or mode == "mws"  # the random graph has no repulsion: mws merges it all


def test_a_graph_without_edges_keeps_every_fragment():
    empty = RegionGraph.empty()
    for mode in HIERARCHICAL:
        assert segments(empty, 3, mode) == [1, 2, 3]


def test_min_size_applies_to_the_new_modes():
    assert segments(TWO_GROUPS, 5, "gasp_average", sizes=[10, 10, 10, 4, 4]) == [1, 1, 1, 2, 2]
    nodes = np.arange(1, 6, dtype=np.uint64)
    table = agglomerate(TWO_GROUPS, nodes, np.array([10, 10, 10, 4, 4]), mode="gasp_average", min_size=9)
    assert table.segments.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("mode", HIERARCHICAL)
def test_every_mode_is_selectable_by_both_config_keys(mode):
    from melecole.blockwise.plan import build_options

    assert _CHOICES["INFERENCE.AGGLOMERATION"] == ("none", *AGGLOMERATION_MODES)
    cfg = get_default_cfg()
    cfg.INFERENCE.AGGLOMERATION = mode
    cfg.INFERENCE.AGGLOMERATION_THRESHOLD = 0.7
    cfg.BLOCKWISE.AGGLOMERATION = mode
    volume = build_segmentation_options(cfg, "volume")
    assert (volume.agglomeration, volume.agglomeration_threshold) == (mode, 0.7)
    assert build_options(cfg).segmentation.agglomeration == mode


def test_config_validation_lists_the_new_modes(tmp_path):
    from melecole.config import load_cfg

    config = tmp_path / "c.yaml"
    config.write_text("INFERENCE:\n  AGGLOMERATION: gasp_average\n")
    assert load_cfg(str(config)).INFERENCE.AGGLOMERATION == "gasp_average"
    config.write_text("INFERENCE:\n  AGGLOMERATION: waterz\n")
    with pytest.raises(ConfigError, match="INFERENCE.AGGLOMERATION.*gasp_average, gasp_signed, mala_median, multicut"):
        load_cfg(str(config))


def test_the_whole_volume_pipeline_runs_a_hierarchical_mode():
    """segment_volume with INFERENCE.AGGLOMERATION gasp_average: two touching boxes with a weak boundary
    between them and noise-split halves inside each come out as the two boxes."""
    from melecole.inference.affinities import affinities_from_labels
    from melecole.segmentation.mws import mws_weights
    from melecole.segmentation.volume import segment_volume

    cfg = get_default_cfg()
    cfg.INFERENCE.AGGLOMERATION = "gasp_average"
    cfg.INFERENCE.AGGLOMERATION_THRESHOLD = 0.5
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 0
    options = build_segmentation_options(cfg, "volume")
    labels = np.ones((4, 12, 12), np.uint32)
    labels[:, :, 6:] = 2
    affinities = affinities_from_labels(labels, options.offsets).astype(np.float32)
    affinities[:3, :, 3, :] = np.minimum(affinities[:3, :, 3, :], 0.6)  # a soft seam inside each box
    result = segment_volume(mws_weights(affinities, options.num_attractive), None, options, 0.5)
    assert len(np.unique(result)) == 2
    assert len(np.unique(result[labels == 1])) == 1 and len(np.unique(result[labels == 2])) == 1


def test_signed_gasp_lets_long_range_contacts_keep_two_segments_apart():
    """1-2 touch with mean affinity 0.7 over 4 contacts, but 20 long-range contacts at 0.1 say they differ:
    average linkage on nearest-neighbour contacts merges them, the signed graph (mean vote
    (4 * 0.7 + 20 * 0.1) / 24 - 0.5 = -0.3) does not. 2-3 only have long-range contacts at 0.9: a
    positive vote alone never joins fragments that do not touch."""
    graph = make_graph([(1, 2, 0.7, 4)], repulsive=[(1, 2, 0.1, 20), (2, 3, 0.9, 10)])
    assert segments(graph, 3, "gasp_average") == [1, 1, 2]
    assert segments(graph, 3, "gasp_signed") == [1, 2, 3]
    # without the repulsion the two modes agree, and the vote is recomputed after a merge:
    # 1-2 (0.9) merge first; then {1,2}-3 has votes 0.6 (1-3, 2 contacts) and 0.2 (2-3 long range, 8 contacts):
    # mean (2 * 0.6 + 8 * 0.2) / 10 - 0.5 = -0.22 keeps 3 apart, where gasp_average (only 1-3) merges it.
    graph = make_graph([(1, 2, 0.9, 5), (1, 3, 0.6, 2)], repulsive=[(2, 3, 0.2, 8)])
    assert segments(graph, 3, "gasp_average") == [1, 1, 1]
    assert segments(graph, 3, "gasp_signed") == [1, 1, 2]
