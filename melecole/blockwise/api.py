"""Entry points for scripts: config + parsed flags -> :func:`segment_blockwise`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from yacs.config import CfgNode as CN

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import PassSummary, segment_blockwise, work_folder
from melecole.errors import ConfigError
from melecole.io.volumes import parse_volume_url

__all__ = ["add_blockwise_arguments", "run_from_args", "infer_blockwise"]

ZYX = ("Z", "Y", "X")


def add_blockwise_arguments(parser: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    """Options shared by ``python -m melecole.blockwise`` and ``infer.py --blockwise`` (which has its own
    --overwrite: ``overwrite=False``)."""
    add = parser.add_argument
    add("--block", type=int, nargs=3, metavar=ZYX, help="block shape (default BLOCKWISE.BLOCK_SHAPE)")
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--workers", type=int, help="LocalCluster processes (default BLOCKWISE.WORKERS)")
    engine.add_argument("--scheduler", metavar="ADDRESS", help="use a running dask scheduler, e.g. tcp://host:8786")
    add("--scheduler-timeout", type=float, default=10.0, metavar="S", help="seconds to wait for --scheduler")
    add("--fragments", choices=("mws", "watershed"), help="fragment mode (default BLOCKWISE.FRAGMENTS)")
    add("--resume", action="store_true", help="finish an interrupted run (skip blocks done)")
    if overwrite:
        add("--overwrite", action="store_true", help="replace an existing output / interrupted run")


def run_from_args(
    cfg: CN, args: argparse.Namespace, affinities_url: str, output_url: str, *, foreground_url: str | None = None
) -> list[PassSummary]:
    """Runs a blockwise segmentation for the flags of :func:`add_blockwise_arguments`."""
    options = build_options(cfg, block_shape=args.block, fragments=args.fragments)
    workers = args.workers if args.workers is not None else int(cfg.BLOCKWISE.WORKERS)
    if workers < 1:
        raise ConfigError(f"--workers: {workers}, expected >= 1")
    return segment_blockwise(
        affinities_url,
        output_url,
        options,
        foreground_url=foreground_url,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=cfg.LOG.PROGRESS_BAR,
        workers=workers,
        scheduler=args.scheduler,
        scheduler_timeout=args.scheduler_timeout,
    )


def _prediction_folder(output_url: str) -> Path:
    """Where ``infer.py --blockwise`` keeps the predicted affinities until the segmentation is done."""
    folder = work_folder(parse_volume_url(output_url))
    return folder.parent / (folder.name[: -len(".blockwise")] + ".predicted")


def infer_blockwise(cfg: CN, args: argparse.Namespace) -> list[PassSummary]:
    """``infer.py --blockwise``: chunked affinity prediction (bounded memory, in this process), then the
    blockwise segmentation of those affinities on dask. Predictions are kept beside the output until
    the segmentation is committed, so ``--resume`` skips a finished prediction.
    """
    # The one import of chunked prediction in melecole.blockwise (it pulls in torch).
    from melecole.inference.chunked import predict_affinities_to_store
    from melecole.inference.options import build_predict_options

    if not args.input or not args.output:
        raise ConfigError("--blockwise needs --input URL (raw) and --output URL (zarr segmentation)")
    build_options(cfg, block_shape=args.block, fragments=args.fragments)  # fail on bad options before predicting
    folder = _prediction_folder(args.output)
    affinities, foreground = f"{folder / 'affinities.zarr'}", f"{folder / 'foreground.zarr'}"
    if not (args.resume and (folder / "complete").is_file()):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        summary = predict_affinities_to_store(
            build_predict_options(cfg), args.checkpoint, args.input, affinities, cfg=cfg, membranes_url=foreground,
            raw_key=args.raw_key or cfg.DATASET.RAW_KEY, output_dtype="uint8", progress=cfg.LOG.PROGRESS_BAR,
        )
        (folder / "complete").write_text("done\n")
        print(f"affinities: {summary.chunks} blocks in {summary.seconds:.1f} s")
    summaries = run_from_args(cfg, args, affinities, args.output, foreground_url=foreground)
    shutil.rmtree(folder, ignore_errors=True)
    return summaries
