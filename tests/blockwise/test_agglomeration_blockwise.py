"""The hierarchical agglomeration modes blockwise: the file run (no dask) equals the in-memory reference,
and the tuning table of the blockwise fragments (summed over blocks) scores exactly what the blockwise
segmentation scores voxel by voxel, size filter and blockwise background fill included."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import SerialExecutor, segment_blockwise
from melecole.blockwise.segment import segment_blockwise_in_memory
from melecole.cli.tune import blockwise_problem, table_scores
from melecole.evaluation.metrics import evaluate_segmentation
from melecole.io.volumes import open_volume
from melecole.segmentation.tuning import lookup_table, sweep


@pytest.mark.parametrize("mode", ("gasp_average", "multicut"))
def test_file_run_equals_in_memory_reference(blockwise_cfg, tiny_volume, tmp_path, mode):
    cfg = blockwise_cfg.clone()
    cfg.BLOCKWISE.AGGLOMERATION = mode
    cfg.BLOCKWISE.THRESHOLD = 0.6
    options = build_options(cfg)
    in_memory, table = segment_blockwise_in_memory(tiny_volume["affinities"], options)
    assert 5 < table.num_segments < len(table.fragments)  # it merged, and not everything
    output = tmp_path / "seg.zarr"
    segment_blockwise(
        f"{tiny_volume['path']}:affinities", str(output), options, executor=SerialExecutor(), progress=False,
        report=lambda line: None,
    )
    np.testing.assert_array_equal(open_volume(output).read(), in_memory)


@pytest.fixture(scope="module")
def boundary_foreground(tiny_volume):
    """Low on boundaries (the weakest nearest-neighbour affinity), so the fragments leave background."""
    return tiny_volume["affinities"][:3].min(axis=0)


@pytest.mark.parametrize("fragments, fill_halo", [("mws", [2, 4, 4]), ("watershed", [1, 1, 1])])
def test_tuning_table_equals_voxel_evaluation_blockwise(blockwise_cfg, tiny_volume, boundary_foreground, fragments,
                                                        fill_halo):
    cfg = blockwise_cfg.clone()
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 60
    cfg.BLOCKWISE.FILL_HALO = fill_halo  # the fill is per block, within this halo (not the whole volume)
    gt = tiny_volume["labels"].copy()
    gt[:, ::7] = 0  # unlabelled voxels are ignored
    affinities = tiny_volume["affinities"]
    problem, options = blockwise_problem(affinities, boundary_foreground, gt, cfg, fragments_mode=fragments)
    assert (problem.overlaps.fragments == 0).any()
    modes = ("mws", "mean", "gasp_average", "gasp_signed", "mala_median", "multicut")
    points = sweep(problem, modes, (0.4, 0.7), table_scores)
    dropped = 0
    for point in points:
        threshold = 0.5 if point.threshold is None else point.threshold
        dropped += int((lookup_table(problem, point.mode, threshold).segments == 0).sum())
        segmentation = dataclasses.replace(options.segmentation, agglomeration=point.mode,
                                           agglomeration_threshold=threshold)
        labels, _ = segment_blockwise_in_memory(
            affinities, dataclasses.replace(options, segmentation=segmentation), boundary_foreground
        )
        scores = evaluate_segmentation(labels, gt, top_k=0)
        assert abs(scores.vi_split - point.vi_split) < 1e-9, point
        assert abs(scores.vi_merge - point.vi_merge) < 1e-9, point
        assert abs(scores.arand - point.arand) < 1e-9, point
    assert dropped > 0
    assert len({round(p.vi_total, 6) for p in points}) > 4
