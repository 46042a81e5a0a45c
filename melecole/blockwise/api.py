"""Entry points for scripts: config + parsed flags -> :func:`segment_blockwise`."""

from __future__ import annotations

import argparse

from yacs.config import CfgNode as CN

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import PassSummary, segment_blockwise
from melecole.errors import ConfigError

__all__ = ["run_from_args"]


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
        progress=bool(cfg.LOG.PROGRESS_BAR),
        workers=workers,
        scheduler=args.scheduler,
        scheduler_timeout=args.scheduler_timeout,
    )
