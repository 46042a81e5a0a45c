"""Entry points for scripts: config + parsed flags -> :func:`segment_blockwise`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from yacs.config import CfgNode as CN

from melecole.blockwise.output import (
    OutputTarget,
    absolute_url,
    check_flags,
    check_target,
    clear_work_folder,
    complete_line,
    output_state,
    output_target,
)
from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import PassSummary, dask_executor, report_dashboard, run_pass, segment_blockwise
from melecole.blockwise.tasks import BlockwiseJob, json_safe
from melecole.errors import ConfigError
from melecole.io.ownership import OutputLock

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
    check_flags(args.resume, args.overwrite, args.scheduler_timeout)
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
    return output_target(output_url).prediction_folder


def infer_blockwise(cfg: CN, args: argparse.Namespace, report: Callable[[str], None] = print) -> list[PassSummary]:
    """``infer.py --blockwise``: one dask run of chunked affinity prediction (a pass of block tasks,
    :mod:`melecole.blockwise.predict`) and the blockwise segmentation of those affinities.

    Everything is checked before the cluster starts, and the output's lock is held from the first check
    to the commit. The predictions stay beside the output until the segmentation is committed, so
    ``--resume`` skips the blocks already predicted.
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
    check_flags(args.resume, args.overwrite, args.scheduler_timeout)
    options = build_options(cfg, block_shape=args.block, fragments=args.fragments)
    workers = _workers(cfg, args)
    target = output_target(args.output)
    threads = 0 if args.scheduler else default_threads(workers)
    raw_key = args.raw_key or cfg.DATASET.RAW_KEY
    job = plan_prediction(cfg, args.checkpoint, args.input, raw_key, target.prediction_folder, threads, args.chunk,
                          args.halo)
    inputs = {"--input": job.input_url, "--checkpoint": job.checkpoint}
    check_target(target, inputs)
    with OutputLock(target.workdir, target.what, report):
        if _already_complete(target, job, options, args, report):
            return []
        prepare_prediction(job, resume=args.resume, overwrite=args.overwrite, what=target.what)
        with dask_executor(workers, args.scheduler, args.scheduler_timeout) as executor:
            report_dashboard(executor, report)
            summaries = [run_pass(job, PREDICT_PASS, predict_task, executor, cfg.LOG.PROGRESS_BAR, report)]
            summaries += segment_blockwise(
                job.affinities_url, args.output, options, foreground_url=job.foreground_url, resume=args.resume,
                overwrite=args.overwrite, progress=cfg.LOG.PROGRESS_BAR, executor=executor, report=report,
                inputs=inputs, provenance=job.manifest(),
            )
        clear_work_folder(job.path, target.what)
        job.path.rmdir()
    return summaries


def _already_complete(
    target: OutputTarget, job: Any, options: Any, args: argparse.Namespace, report: Callable[[str], None]
) -> bool:
    """Checks an existing output or interrupted run against this command before any prediction:
    True (and a line) when ``--resume`` finds this command's finished output; a one-line DataError for
    an output or run that the flags do not allow (the segmentation's own check repeats this later)."""
    if not target.final.exists() and not target.workdir.exists():
        return False
    segmentation = BlockwiseJob(
        absolute_url(job.affinities_url), absolute_url(job.foreground_url), str(target.workdir),  # type: ignore[arg-type]
        job.shape, options, job.resolution,
    )
    manifest = json_safe(segmentation.manifest())
    fingerprint = json_safe({**manifest, "prediction": job.manifest()})
    if output_state(target, manifest, fingerprint, resume=args.resume, overwrite=args.overwrite) != "complete":
        return False
    report(complete_line(target))
    return True
