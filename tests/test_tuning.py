"""melecole.segmentation.tuning and melecole-tune: the overlap table's scores equal the voxel-level
evaluation of the same segmentation exactly, size filter and background fill included."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from scipy import ndimage

from melecole.cli.tune import main, table_scores, volume_problem
from melecole.config import get_default_cfg
from melecole.evaluation.metrics import evaluate_segmentation
from melecole.inference.affinities import affinities_from_labels
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES, LookupTable
from melecole.segmentation.mws import mws_weights
from melecole.segmentation.tuning import (
    OverlapTable,
    best_points,
    lookup_table,
    overlap_table,
    segmentation_overlaps,
    sum_overlaps,
    sweep,
)
from melecole.segmentation.volume import segment_volume

SHAPE = (12, 40, 40)
MODES = ("none", *AGGLOMERATION_MODES)


def cell_labels(seed: int = 0, cells: int = 20) -> np.ndarray:
    """(Z, Y, X) uint32: each voxel takes its nearest of ``cells`` random seeds (z counts 4x)."""
    rng = np.random.default_rng(seed)
    markers = np.zeros(SHAPE, np.int32)
    markers[tuple(rng.integers(0, SHAPE, size=(cells, 3)).T)] = np.arange(1, cells + 1)
    _, index = ndimage.distance_transform_edt(markers == 0, sampling=(4, 1, 1), return_indices=True)
    return markers[tuple(index)].astype(np.uint32)


@pytest.fixture(scope="module")
def volume():
    """Noisy affinities (float16, as stored), a foreground that is low on boundaries (so the watershed
    leaves background to fill), and a ground truth with 0 on some boundary voxels (ignored)."""
    cfg = get_default_cfg()
    labels = cell_labels()
    rng = np.random.default_rng(1)
    ideal = affinities_from_labels(labels, cfg.INFERENCE.OFFSETS)
    affinities = np.clip(ndimage.gaussian_filter(ideal, (0, 0.5, 1, 1)) + rng.normal(0, 0.2, ideal.shape), 0, 1)
    foreground = np.clip(ndimage.gaussian_filter(ideal[:3].min(axis=0), 1.0) + rng.normal(0, 0.1, SHAPE), 0, 1)
    gt = labels.copy()
    gt[(ideal[1] < 0.5) & (rng.random(SHAPE) < 0.5)] = 0
    return {"affinities": affinities.astype(np.float16), "foreground": foreground.astype(np.float16), "gt": gt}


def test_overlap_table_counts_pairs_and_ignores_ground_truth_zero():
    fragments = np.array([[[0, 1, 1, 2], [2, 2, 7, 7]]], np.uint64)
    gt = np.array([[[5, 5, 0, 5], [6, 6, 6, 0]]], np.uint32)
    table = overlap_table(fragments, gt)
    assert table.fragments.tolist() == [0, 1, 2, 2, 7] and table.gt.tolist() == [5, 5, 5, 6, 6]
    assert table.counts.tolist() == [1, 1, 1, 2, 1] and table.n_voxels == 6
    halves = sum_overlaps([overlap_table(fragments[..., s], gt[..., s]) for s in (slice(0, 2), slice(2, 4))])
    assert [halves.fragments.tolist(), halves.gt.tolist(), halves.counts.tolist()] == [
        table.fragments.tolist(), table.gt.tolist(), table.counts.tolist()
    ]


def test_merged_rows_give_the_segmentation_table():
    """Fragments 1, 2 -> segment 1; 3 dropped by the size filter -> 0 (an ordinary segment without fill)."""
    table = OverlapTable(np.array([0, 1, 2, 3], np.uint64), np.array([4, 4, 5, 5], np.uint64), np.array([2, 3, 1, 6]))
    lookup = LookupTable(np.array([1, 2, 3], np.uint64), np.array([1, 1, 0], np.uint64))
    from melecole.segmentation.tuning import TuningProblem

    problem = TuningProblem(None, lookup.fragments, np.ones(3), table)  # type: ignore[arg-type]
    segments, gt, counts = segmentation_overlaps(problem, lookup)
    assert list(zip(segments.tolist(), gt.tolist(), counts.tolist())) == [(0, 4, 2), (0, 5, 6), (1, 4, 3), (1, 5, 1)]


def run_pipeline(volume, options, mode, threshold):
    weights = mws_weights(volume["affinities"], options.num_attractive)
    settings = dataclasses.replace(options, agglomeration=mode, agglomeration_threshold=threshold)
    return segment_volume(weights, volume["foreground"], settings, options.background)


@pytest.mark.parametrize("fill, power", ((True, 0.0), (False, 0.0), (True, 3.0)))
def test_table_scores_equal_voxel_evaluation_of_infer_segmentation(volume, fill, power):
    cfg = get_default_cfg()
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 40
    cfg.INFERENCE.FILL_BACKGROUND = fill
    cfg.INFERENCE.MWS_FOREGROUND_POWER = power
    problem, options = volume_problem(volume["affinities"], volume["foreground"], volume["gt"], cfg)
    assert (problem.overlaps.fragments == 0).any()  # the watershed left background
    thresholds = (0.3, 0.6, 0.8)
    points = sweep(problem, MODES, thresholds, table_scores)
    assert len(points) == 2 + (len(MODES) - 2) * len(thresholds)  # none and mws take no threshold
    dropped = 0
    for point in points:
        threshold = 0.5 if point.threshold is None else point.threshold
        table = lookup_table(problem, point.mode, threshold)
        dropped += int((table.segments == 0).sum())
        scores = evaluate_segmentation(run_pipeline(volume, options, point.mode, threshold), volume["gt"], top_k=0)
        assert abs(scores.vi_split - point.vi_split) < 1e-9, point
        assert abs(scores.vi_merge - point.vi_merge) < 1e-9, point
        assert abs(scores.arand - point.arand) < 1e-9, point
    assert dropped > 0  # the size filter did drop segments in some settings
    assert len({round(p.vi_total, 6) for p in points}) > 5  # the settings really differ
    assert best_points(points)["gasp_average"].vi_total == min(p.vi_total for p in points if p.mode == "gasp_average")


def write_inputs(tmp_path, volume) -> dict:
    paths = {"affinities": tmp_path / "aff.hdf", "foreground": tmp_path / "fg.hdf", "gt": tmp_path / "gt.hdf"}
    with h5py.File(paths["affinities"], "w") as handle:
        handle["affinities"] = volume["affinities"]
    with h5py.File(paths["foreground"], "w") as handle:
        handle["membranes"] = volume["foreground"]
    with h5py.File(paths["gt"], "w") as handle:
        handle["labels"] = volume["gt"]
        handle["volume"] = np.zeros(SHAPE, np.uint8)
    config = tmp_path / "tune.yaml"
    config.write_text("INFERENCE:\n  MIN_SEGMENT_SIZE: 40\nBLOCKWISE:\n  BLOCK_SHAPE: [6, 20, 20]\n"
                      "  OUTPUT_CHUNKS: [6, 20, 20]\n")
    return {key: str(value) for key, value in paths.items()} | {"config": str(config)}


@pytest.mark.parametrize("blockwise", (False, True))
def test_cli_prints_the_curves_the_best_setting_and_verifies_it(tmp_path, volume, capsys, blockwise):
    paths = write_inputs(tmp_path, volume)
    argv = ["--affinities", paths["affinities"], "--foreground", paths["foreground"], "--gt", paths["gt"],
            "--modes", "gasp_average", "mws", "--thresholds", "0.4", "0.7", "--verify", "--config", paths["config"]]
    assert main(argv + (["--blockwise"] if blockwise else [])) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("  gasp_average") and len(line.split()) == 7]
    assert [row[1] for row in rows[:2]] == ["0.400", "0.700"]
    key = "BLOCKWISE.AGGLOMERATION" if blockwise else "INFERENCE.AGGLOMERATION"
    assert f"best: {key} " in out and "sweep of 3 settings" in out
    differences = [float(line.split("|voxels - table| <= ")[1].split(";")[0]) for line in out.splitlines()
                   if "|voxels - table|" in line]
    assert len(differences) == 2 and max(differences) < 1e-9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--modes", "waterz"], "error: --modes: 'waterz', expected some of none, mws, mean, gasp_average"),
        (["--thresholds", "1.5"], "error: --thresholds: 1.5, expected values in [0, 1]"),
        (["--block", "4", "4", "4"], "error: --block / --fragments: only with --blockwise"),
        (["--blockwise", "--modes", "none"], "error: --modes: 'none', expected some of mws, mean"),
    ],
)
def test_cli_flags_are_checked_in_one_line(tmp_path, volume, capsys, extra, message):
    paths = write_inputs(tmp_path, volume)
    argv = ["--affinities", paths["affinities"], "--gt", paths["gt"], *extra, "--config", paths["config"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cli_refuses_inputs_that_do_not_fit(tmp_path, volume, capsys):
    paths = write_inputs(tmp_path, volume)
    with h5py.File(tmp_path / "short.hdf", "w") as handle:
        handle["affinities"] = volume["affinities"][:5]
        handle["labels"] = np.zeros(SHAPE, np.uint32)
    base = ["--affinities", paths["affinities"], "--gt", paths["gt"], "--config", paths["config"]]
    assert main(["--affinities", str(tmp_path / "short.hdf"), *base[2:]]) == 2
    assert "5 channels, expected 12 (INFERENCE.OFFSETS)" in capsys.readouterr().err
    assert main([*base[:2], "--gt", str(tmp_path / "short.hdf"), *base[4:]]) == 2
    assert "no labelled (non-zero) voxel" in capsys.readouterr().err
