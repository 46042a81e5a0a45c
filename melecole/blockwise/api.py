"""Entry points for scripts: config + parsed flags -> :func:`segment_blockwise`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Callable

from yacs.config import CfgNode as CN

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import (
    PassSummary,
    check_output,
    dask_executor,
    report_dashboard,
    run_pass,
    segment_blockwise,
    work_folder,
)
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


def _workers(cfg: CN, args: argparse.Namespace) -> int:
    workers = args.workers if args.workers is not None else int(cfg.BLOCKWISE.WORKERS)
    if workers < 1:
        raise ConfigError(f"--workers: {workers}, expected >= 1")
    return workers


def run_from_args(
    cfg: CN, args: argparse.Namespace, affinities_url: str, output_url: str, *, foreground_url: str | None = None
) -> list[PassSummary]:
    """Runs a blockwise segmentation for the flags of :func:`add_blockwise_arguments`."""
    options = build_options(cfg, block_shape=args.block, fragments=args.fragments)
    workers = _workers(cfg, args)
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


def infer_blockwise(cfg: CN, args: argparse.Namespace, report: Callable[[str], None] = print) -> list[PassSummary]:
    """``infer.py --blockwise``: one dask run of chunked affinity prediction (a pass of block tasks,
    :mod:`melecole.blockwise.predict`) and the blockwise segmentation of those affinities.

    Everything is checked before the cluster starts. The predictions stay beside the output until
    the segmentation is committed, so ``--resume`` skips the blocks already predicted.
    """
    from melecole.blockwise.predict import (
        PREDICT_PASS,
        default_threads,
        plan_prediction,
        predict_task,
        prepare_prediction,
    )

    if not args.input or not args.output:
        raise ConfigError("--blockwise needs --input URL (raw) and --output URL (zarr segmentation)")
    options = build_options(cfg, block_shape=args.block, fragments=args.fragments)
    workers = _workers(cfg, args)
    if check_output(args.output, resume=args.resume, overwrite=args.overwrite):
        report(f"--output '{args.output}': already complete, nothing to resume")
        return []
    threads = 0 if args.scheduler else default_threads(workers)
    raw_key = args.raw_key or cfg.DATASET.RAW_KEY
    folder = _prediction_folder(args.output)
    job = plan_prediction(cfg, args.checkpoint, args.input, raw_key, folder, threads, args.chunk, args.halo)
    prepare_prediction(job, resume=args.resume)
    with dask_executor(workers, args.scheduler, args.scheduler_timeout) as executor:
        report_dashboard(executor, report)
        summaries = [run_pass(job, PREDICT_PASS, predict_task, executor, cfg.LOG.PROGRESS_BAR, report)]
        summaries += segment_blockwise(
            job.affinities_url, args.output, options, foreground_url=job.foreground_url, resume=args.resume,
            overwrite=args.overwrite, progress=cfg.LOG.PROGRESS_BAR, executor=executor, report=report,
        )
    shutil.rmtree(job.path, ignore_errors=True)
    return summaries
