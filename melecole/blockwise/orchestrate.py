"""The blockwise runs as library calls (plain values in): stored affinities -> segmentation
(:func:`run_blockwise`, ``python -m melecole.blockwise``) and ``infer.py --blockwise``
(:func:`infer_blockwise`: a prediction pass, then the segmentation, in one dask run).

Their command lines are :mod:`melecole.cli.blockwise` and :mod:`melecole.cli.infer`; error messages
name the flags those take (``--workers``, ``--resume``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

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

__all__ = ["run_blockwise", "infer_blockwise", "resolve_workers"]


def resolve_workers(cfg: CN, workers: int | None) -> int:
    """``workers`` (``--workers``), or BLOCKWISE.WORKERS when None; ConfigError below 1."""
    workers = workers if workers is not None else int(cfg.BLOCKWISE.WORKERS)
    if workers < 1:
        raise ConfigError(f"--workers: {workers}, expected >= 1")
    return workers


def run_blockwise(
    cfg: CN,
    affinities_url: str,
    output_url: str,
    *,
    foreground_url: str | None = None,
    block_shape: Sequence[int] | None = None,
    fragments: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_timeout: float = 10.0,
    resume: bool = False,
    overwrite: bool = False,
) -> list[PassSummary]:
    """Segments stored affinities block by block (``python -m melecole.blockwise``).

    ``block_shape``, ``fragments`` and ``workers`` override BLOCKWISE.BLOCK_SHAPE, BLOCKWISE.FRAGMENTS
    and BLOCKWISE.WORKERS (None: the config's); the rest is as in :func:`segment_blockwise`.
    """
    check_flags(resume, overwrite, scheduler_timeout)
    options = build_options(cfg, block_shape=block_shape, fragments=fragments)
    workers = resolve_workers(cfg, workers)
    return segment_blockwise(
        affinities_url,
        output_url,
        options,
        foreground_url=foreground_url,
        resume=resume,
        overwrite=overwrite,
        progress=cfg.LOG.PROGRESS_BAR,
        workers=workers,
        scheduler=scheduler,
        scheduler_timeout=scheduler_timeout,
    )


def _prediction_folder(output_url: str) -> Path:
    """Where ``infer.py --blockwise`` keeps the predicted affinities until the segmentation is done."""
    return output_target(output_url).prediction_folder


def infer_blockwise(
    cfg: CN,
    checkpoint: str,
    input_url: str,
    output_url: str,
    *,
    raw_key: str | None = None,
    chunk: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    block_shape: Sequence[int] | None = None,
    fragments: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    scheduler_timeout: float = 10.0,
    resume: bool = False,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
) -> list[PassSummary]:
    """``infer.py --blockwise``: one dask run of chunked affinity prediction (a pass of block tasks,
    :mod:`melecole.blockwise.predict`) and the blockwise segmentation of those affinities.

    Everything is checked before the cluster starts, and the output's lock is held from the first check
    to the commit. The predictions stay beside the output until the segmentation is committed, so
    ``resume`` skips the blocks already predicted. ``raw_key`` None: DATASET.RAW_KEY; ``chunk`` /
    ``halo``: as in :func:`melecole.blockwise.predict.plan_prediction`; the other options as in
    :func:`run_blockwise`.
    """
    from melecole.blockwise.predict import (
        PREDICT_PASS,
        default_threads,
        plan_prediction,
        predict_task,
        prepare_prediction,
    )

    check_flags(resume, overwrite, scheduler_timeout)
    options = build_options(cfg, block_shape=block_shape, fragments=fragments)
    workers = resolve_workers(cfg, workers)
    target = output_target(output_url)
    threads = 0 if scheduler else default_threads(workers)
    raw_key = raw_key or cfg.DATASET.RAW_KEY
    job = plan_prediction(cfg, checkpoint, input_url, raw_key, target.prediction_folder, threads, chunk, halo)
    inputs = {"--input": job.input_url, "--checkpoint": job.checkpoint}
    check_target(target, inputs)
    with OutputLock(target.workdir, target.what, report):
        if _already_complete(target, job, options, resume, overwrite, report):
            return []
        prepare_prediction(job, resume=resume, overwrite=overwrite, what=target.what)
        with dask_executor(workers, scheduler, scheduler_timeout, report=report) as executor:
            report_dashboard(executor, report)
            summaries = [run_pass(job, PREDICT_PASS, predict_task, executor, cfg.LOG.PROGRESS_BAR, report)]
            summaries += segment_blockwise(
                job.affinities_url, output_url, options, foreground_url=job.foreground_url, resume=resume,
                overwrite=overwrite, progress=cfg.LOG.PROGRESS_BAR, executor=executor, report=report,
                inputs=inputs, provenance=job.manifest(),
            )
        clear_work_folder(job.path, target.what)
        job.path.rmdir()
    return summaries


def _already_complete(
    target: OutputTarget, job: Any, options: Any, resume: bool, overwrite: bool, report: Callable[[str], None]
) -> bool:
    """Checks an existing output or interrupted run against this command before any prediction:
    True (and a line) when ``resume`` finds this command's finished output; a one-line DataError for
    an output or run that the flags do not allow (the segmentation's own check repeats this later)."""
    if not target.final.exists() and not target.workdir.exists():
        return False
    segmentation = BlockwiseJob(
        absolute_url(job.affinities_url), absolute_url(job.foreground_url), str(target.workdir),  # type: ignore[arg-type]
        job.shape, options, job.resolution,
    )
    manifest = json_safe(segmentation.manifest())
    fingerprint = json_safe({**manifest, "prediction": job.manifest()})
    if output_state(target, manifest, fingerprint, resume=resume, overwrite=overwrite) != "complete":
        return False
    report(complete_line(target))
    return True
