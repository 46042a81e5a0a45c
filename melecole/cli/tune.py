"""`melecole-tune`: the agglomeration's VI / ARAND curve per mode and threshold, exactly, in one pass.

    melecole-tune --affinities results/last/val_affinities.hdf --foreground results/last/val_membranes.hdf \
        --gt ../shared/data/medulla/val/medulla_val.hdf --config configs/medulla-UNet3D.yaml
    melecole-tune ... --blockwise --modes mws gasp_average --thresholds 0.3 0.5 0.7 --verify

The fragments (``infer.py``'s voxel mutex watershed, or with --blockwise the blockwise fragments per
block) and their region graph are computed once, with the fragment x ground-truth overlap table (per
block and summed, with --blockwise). Each setting is then scored from that table
(melecole/segmentation/tuning.py): VI split / merge in bits and adapted Rand error, exactly what
``variation_of_information.py`` gives for the segmentation ``infer.py`` (INFERENCE.AGGLOMERATION,
INFERENCE.AGGLOMERATION_THRESHOLD) or blockwise (BLOCKWISE.AGGLOMERATION, BLOCKWISE.THRESHOLD) would
write with that setting, size filter and background fill included (the fill is recomputed for the
voxels at 0, the one per-setting step that reads voxels). --verify reruns the segmentation at each
mode's best setting and scores it voxel by voxel, with the time of that one setting.
Nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import time
from typing import Any

import numpy as np

from melecole.config import load_cfg
from melecole.errors import ConfigError, DataError
from melecole.evaluation.contingency import ContingencyTable
from melecole.evaluation.metrics import conditional_entropies, evaluate_segmentation, rand_scores
from melecole.evaluation.volumes import align_to_gt
from melecole.io.checks import check_same_fingerprint
from melecole.io.codec import decode_probabilities
from melecole.io.volumes import open_volume
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES
from melecole.segmentation.fragments import FRAGMENT_ALGORITHMS
from melecole.segmentation.postprocess import fill_heightmap
from melecole.segmentation.tuning import (
    BackgroundFill,
    TuningPoint,
    TuningProblem,
    best_points,
    overlap_table,
    sum_overlaps,
    sweep,
    volume_fragments,
)
from melecole.utils.cli import add_config_arguments, run_cli

__all__ = ["build_parser", "main", "table_scores", "volume_problem", "blockwise_problem"]

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melecole-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--affinities", required=True, metavar="URL", help="(C, Z, Y, X) stored affinities: file.hdf[:key], x.zarr")
    add("--gt", required=True, metavar="URL", help="ground-truth labels (default key DATASET.LABEL_KEY); 0 = ignored")
    add("--foreground", metavar="URL", help="(Z, Y, X) foreground probability (infer.py's *_membranes.hdf)")
    add("--modes", nargs="+", metavar="MODE", help="agglomeration modes (default: all; 'none' without --blockwise)")
    add("--thresholds", nargs="+", type=float, metavar="T", help="thresholds in [0, 1] (default 0.05 ... 0.95)")
    add("--blockwise", action="store_true", help="blockwise fragments (BLOCKWISE.*) instead of infer.py's")
    add("--block", type=int, nargs=3, metavar=("Z", "Y", "X"), help="block shape (default BLOCKWISE.BLOCK_SHAPE)")
    add("--fragments", choices=tuple(FRAGMENT_ALGORITHMS), help="fragment algorithm (default BLOCKWISE.FRAGMENTS)")
    add("--verify", action="store_true", help="rerun the segmentation at each mode's best setting, score its voxels")
    add_config_arguments(parser)
    return parser


def check_flags(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """(modes, thresholds) of the flags; one-line ConfigError for a bad one."""
    choices = tuple(AGGLOMERATION_MODES) if args.blockwise else ("none", *AGGLOMERATION_MODES)
    modes = list(dict.fromkeys(args.modes or choices))
    for mode in modes:
        if mode not in choices:
            raise ConfigError(f"--modes: '{mode}', expected some of {', '.join(choices)}")
    thresholds = list(args.thresholds or DEFAULT_THRESHOLDS)
    for value in thresholds:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--thresholds: {value:g}, expected values in [0, 1]")
    if (args.block or args.fragments) and not args.blockwise:
        raise ConfigError("--block / --fragments: only with --blockwise")
    return modes, thresholds


def _read(url: str, default_key: str, role: str, ndim: int) -> np.ndarray:
    volume = open_volume(url, default_key).read()
    if volume.ndim == ndim + 1 and volume.shape[0] == 1 and ndim == 3:
        volume = volume[0]
    if volume.ndim != ndim:
        raise DataError(f"{role} '{url}': shape {volume.shape}, expected {ndim} axes")
    if np.issubdtype(volume.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            if not (volume.min() >= 0 and volume.max() <= 1):
                raise DataError(f"{role} '{url}': values outside [0, 1] or NaN, expected probabilities")
    return volume


def read_inputs(args: argparse.Namespace, cfg: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(affinities as stored, foreground as stored or None, ground truth of the affinities' (Z, Y, X) shape).

    A ground truth smaller than the affinities by the same margin on both sides is padded with 0
    (ignored), a larger one cropped (DATASET.PADDING context): the scores are those of the segmentation
    center-cropped to the ground truth, as ``variation_of_information.py`` computes them.
    """
    check_same_fingerprint({"--affinities": args.affinities, "--foreground": args.foreground})
    affinities = _read(args.affinities, "affinities", "--affinities", 4)
    if affinities.shape[0] != len(cfg.INFERENCE.OFFSETS):
        raise DataError(
            f"--affinities '{args.affinities}': {affinities.shape[0]} channels, expected "
            f"{len(cfg.INFERENCE.OFFSETS)} (INFERENCE.OFFSETS)"
        )
    shape = affinities.shape[1:]
    foreground = None
    if args.foreground:
        foreground = _read(args.foreground, "membranes", "--foreground", 3)
        if foreground.dtype == np.uint8:
            foreground = decode_probabilities(foreground)
        if foreground.shape != shape:
            raise DataError(f"--foreground '{args.foreground}': shape {foreground.shape}, expected {shape}")
    gt = open_volume(args.gt, str(cfg.DATASET.LABEL_KEY)).read()
    if not np.issubdtype(gt.dtype, np.integer):
        raise DataError(f"--gt '{args.gt}': dtype {gt.dtype}, expected integer labels")
    _, cropped, alignment = align_to_gt(np.broadcast_to(np.uint8(0), shape), gt, volume_name="--affinities",
                                        gt_name="--gt")
    padded = np.zeros(shape, dtype=gt.dtype)
    padded[tuple(slice(c, s - c) for c, s in zip(alignment.volume_crop, shape))] = cropped
    if not padded.any():
        raise DataError(f"--gt '{args.gt}': no labelled (non-zero) voxel, expected ground truth to tune on")
    return affinities, foreground, padded


def table_scores(segments: np.ndarray, gt: np.ndarray, counts: np.ndarray) -> tuple[float, float, float]:
    """(VI split, VI merge, adapted Rand error) of unique (segment, gt, voxels) overlaps, by
    :mod:`melecole.evaluation.metrics` (bits; ground-truth 0 must already be left out)."""
    segment_ids, segment_index = np.unique(segments, return_inverse=True)
    gt_ids, gt_index = np.unique(gt, return_inverse=True)
    counts = np.asarray(counts, dtype=np.int64)
    table = ContingencyTable(
        segmentation_ids=segment_ids, gt_ids=gt_ids, pair_segmentation=segment_index.reshape(-1),
        pair_gt=gt_index.reshape(-1), pair_count=counts,
        segmentation_sizes=np.bincount(segment_index.reshape(-1), weights=counts, minlength=len(segment_ids))
        .round().astype(np.int64),
        gt_sizes=np.bincount(gt_index.reshape(-1), weights=counts, minlength=len(gt_ids)).round().astype(np.int64),
        n_voxels=int(counts.sum()), n_total_voxels=int(counts.sum()),
    )
    split, merge = conditional_entropies(table)
    return float(split.sum()), float(merge.sum()), float(rand_scores(table)[0])


def _weights(affinities: np.ndarray, options: Any) -> np.ndarray:
    """The mutex watershed's edge weights from stored affinities, as ``infer.py`` computes them."""
    from melecole.segmentation.mws import mws_weights

    stored = decode_probabilities(affinities) if affinities.dtype == np.uint8 else affinities
    return mws_weights(stored, options.num_attractive)


def volume_problem(
    affinities: np.ndarray, foreground: np.ndarray | None, gt: np.ndarray, cfg: Any
) -> tuple[TuningProblem, Any]:
    """``infer.py``'s fragments (voxel MWS at INFERENCE.MWS_BACKGROUND), graph, overlap table and fill;
    and the ``volume`` options."""
    from melecole.segmentation.options import build_segmentation_options

    options = build_segmentation_options(cfg, "volume")
    labels, graph, ids, sizes = volume_fragments(_weights(affinities, options), foreground, options,
                                                 options.background)
    whole = tuple(slice(0, s) for s in labels.shape)
    heightmap = fill_heightmap(foreground, options.fill_mode)
    fill = BackgroundFill(labels, gt, [(whole, whole)], heightmap=heightmap) if options.fill_background else None
    problem = TuningProblem(graph, ids, sizes, overlap_table(labels, gt), options.min_segment_size, fill)
    return problem, options


def blockwise_problem(
    affinities: np.ndarray, foreground: np.ndarray | None, gt: np.ndarray, cfg: Any,
    block_shape: Any = None, fragments_mode: str | None = None,
) -> tuple[TuningProblem, Any]:
    """The blockwise fragments, graph and per-block overlap tables (summed), as
    :func:`melecole.blockwise.segment.segment_blockwise_in_memory` computes them; and the options."""
    from melecole.blockwise.plan import BlockPlan, build_options
    from melecole.blockwise.segment import fragments_in_memory, graphs_in_memory
    from melecole.segmentation.region_graph import reduce_graphs

    options = build_options(cfg, block_shape=block_shape, fragments=fragments_mode)
    plan = BlockPlan(tuple(affinities.shape[1:]), options.block_shape)  # type: ignore[arg-type]
    fragments = fragments_in_memory(affinities, foreground, plan, options)
    graphs, ids, sizes = graphs_in_memory(fragments, affinities, plan, options)
    tables = [overlap_table(fragments[plan.box(index)], gt[plan.box(index)]) for index in range(plan.num_blocks)]
    segmentation = options.segmentation
    fill = None
    if segmentation.fill_background:
        boxes = [plan.padded(i, options.fill_halo) for i in range(plan.num_blocks)]
        fill = BackgroundFill(fragments, gt, boxes, heightmap=fill_heightmap(foreground, segmentation.fill_mode))
    problem = TuningProblem(
        reduce_graphs(graphs), np.concatenate(ids), np.concatenate(sizes), sum_overlaps(tables),
        segmentation.min_segment_size, fill,
    )
    return problem, options


def verify_point(point: TuningPoint, affinities: np.ndarray, foreground: np.ndarray | None, gt: np.ndarray,
                 options: Any) -> tuple[Any, float]:
    """Reruns the segmentation of ``point`` (``infer.py``'s or blockwise) and scores its voxels:
    (scores, seconds for segmentation + evaluation)."""
    start = time.perf_counter()
    threshold = 0.5 if point.threshold is None else point.threshold
    if hasattr(options, "segmentation"):  # blockwise options
        from melecole.blockwise.segment import segment_blockwise_in_memory

        segmentation = dataclasses.replace(
            options.segmentation, agglomeration=point.mode, agglomeration_threshold=threshold
        )
        labels, _ = segment_blockwise_in_memory(
            affinities, dataclasses.replace(options, segmentation=segmentation), foreground
        )
    else:
        from melecole.segmentation.volume import segment_volume

        settings = dataclasses.replace(options, agglomeration=point.mode, agglomeration_threshold=threshold)
        labels = segment_volume(_weights(affinities, options), foreground, settings, options.background)
    scores = evaluate_segmentation(labels, gt, top_k=0)
    return scores, time.perf_counter() - start


def _row(point: TuningPoint) -> str:
    threshold = "-" if point.threshold is None else f"{point.threshold:.3f}"
    return (
        f"  {point.mode:<13} {threshold:>9} {point.vi_split:8.4f} {point.vi_merge:8.4f} {point.vi_total:8.4f} "
        f"{point.arand:7.4f} {point.segments:9d}"
    )


def format_curves(points: list[TuningPoint], blockwise: bool) -> str:
    """The curve of every mode, the best setting of each and the best overall (lowest VI total)."""
    header = "  " + " ".join(
        [f"{'mode':<13}", f"{'threshold':>9}", "VI split", "VI merge", "VI total", f"{'ARAND':>7}", f"{'segments':>9}"]
    )
    lines = [header]
    previous = None
    for point in points:
        if previous is not None and point.mode != previous:
            lines.append("")
        lines.append(_row(point))
        previous = point.mode
    best = best_points(points)
    lines += ["", "best per mode (lowest VI total):", header, *(_row(p) for p in best.values())]
    winner = min(best.values(), key=lambda p: p.vi_total)
    mode_key, threshold_key = (
        ("BLOCKWISE.AGGLOMERATION", "BLOCKWISE.THRESHOLD") if blockwise
        else ("INFERENCE.AGGLOMERATION", "INFERENCE.AGGLOMERATION_THRESHOLD")
    )
    setting = f"{mode_key} {winner.mode}"
    if winner.threshold is not None:
        setting += f" {threshold_key} {winner.threshold:g}"
    lines.append(f"best: {setting} (VI {winner.vi_total:.4f}, ARAND {winner.arand:.4f})")
    return "\n".join(lines)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C


def _report_verify(best: dict[str, TuningPoint], affinities: np.ndarray, foreground: np.ndarray | None,
                   gt: np.ndarray, options: Any) -> None:
    print("verify (segmentation rerun at the best setting, scored voxel by voxel):", flush=True)
    for point in best.values():
        scores, seconds = verify_point(point, affinities, foreground, gt, options)
        difference = max(abs(scores.vi_split - point.vi_split), abs(scores.vi_merge - point.vi_merge),
                         abs(scores.arand - point.arand))
        print(f"  {point.mode:<13} VI {scores.vi_total:.4f} (split {scores.vi_split:.4f}, merge {scores.vi_merge:.4f}),"
              f" ARAND {scores.arand:.4f}; |voxels - table| <= {difference:.1e}; {seconds:.2f} s", flush=True)


@run_cli
def main(argv: list[str] | None = None) -> int:
    """``melecole-tune``: prints the curve per mode and the best setting. SIGTERM leaves like Ctrl-C."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    modes, thresholds = check_flags(args)
    cfg = load_cfg(args.config, args.opts)
    affinities, foreground, gt = read_inputs(args, cfg)
    start = time.perf_counter()
    if args.blockwise:
        problem, options = blockwise_problem(affinities, foreground, gt, cfg, args.block, args.fragments)
    else:
        problem, options = volume_problem(affinities, foreground, gt, cfg)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    points = sweep(problem, modes, thresholds, table_scores)
    swept = time.perf_counter() - start
    fill = "recomputed per setting" if problem.fill is not None else "off"
    print(
        f"{'blockwise' if args.blockwise else 'infer.py'} fragments: {len(problem.nodes)}, edges {len(problem.graph)}, "
        f"labelled voxels {problem.overlaps.n_voxels}; min segment size {problem.min_size}, background fill {fill}",
        flush=True,
    )
    print(format_curves(points, args.blockwise))
    print(f"time: fragments, graph and table {prepared:.2f} s once; sweep of {len(points)} settings {swept:.2f} s "
          f"({swept / max(len(points), 1):.3f} s per setting)", flush=True)
    if args.verify:
        _report_verify(best_points(points), affinities, foreground, gt, options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
