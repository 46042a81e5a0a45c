"""Segment stored affinities block by block on dask (large volumes).

    python -m melecole.blockwise --affinities aff.zarr --output seg.zarr --config configs/X.yaml
    python -m melecole.blockwise --affinities pred.hdf:affinities --foreground pred.hdf:foreground \
        --output seg.zarr:segmentation --config X.yaml --block 64 256 256 --workers 8 --fragments watershed
    python -m melecole.blockwise ... --scheduler tcp://10.0.0.1:8786     # an existing dask cluster
    python -m melecole.blockwise ... --resume                           # finish an interrupted run

Offsets come from INFERENCE.OFFSETS (the affinities may come from any network); options from
BLOCKWISE.* (see melecole/config/defaults.py). Output: uint64 zarr, 0 only where no segment is near.
Affinities written by ``infer.py`` (``<prefix>_affinities.hdf``) are segmented with the foreground it
stored beside them (``<prefix>_membranes.hdf``, same fingerprint) unless --foreground or
--no-foreground says otherwise: the same masking as infer.py's watershed, and 2.4x faster on the
medulla model's outputs (bench/RESULTS.md, "Blockwise on infer.py's outputs").
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from melecole.config import load_cfg
from melecole.segmentation.fragments import FRAGMENT_ALGORITHMS
from melecole.utils.cli import add_config_arguments, run_cli

__all__ = ["add_blockwise_arguments", "blockwise_keywords", "build_parser", "main"]

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
    add("--fragments", choices=tuple(FRAGMENT_ALGORITHMS), help="fragment algorithm (default BLOCKWISE.FRAGMENTS)")
    add("--resume", action="store_true", help="finish an interrupted run (skip blocks done)")
    if overwrite:
        add("--overwrite", action="store_true", help="replace an existing output / interrupted run")


def blockwise_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The values of :func:`add_blockwise_arguments`' flags (and --overwrite) as keyword arguments of
    :func:`melecole.blockwise.orchestrate.run_blockwise` / ``infer_blockwise``."""
    return dict(
        block_shape=args.block,
        fragments=args.fragments,
        workers=args.workers,
        scheduler=args.scheduler,
        scheduler_timeout=args.scheduler_timeout,
        resume=args.resume,
        overwrite=args.overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melecole.blockwise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--affinities", required=True, metavar="URL", help="(C, Z, Y, X): file.hdf:key, x.zarr, ...")
    foreground = parser.add_mutually_exclusive_group()
    foreground.add_argument(
        "--foreground", metavar="URL",
        help="(Z, Y, X) foreground probability (default: infer.py's <prefix>_membranes.hdf beside the affinities)",
    )  # fmt: skip
    foreground.add_argument("--no-foreground", action="store_true", help="segment without a foreground")
    parser.add_argument("--output", required=True, metavar="URL", help="zarr output: x.zarr or x.zarr:key")
    add_blockwise_arguments(parser)
    add_config_arguments(parser)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C (the cluster is closed on the way out)


@run_cli
def main(argv: list[str] | None = None) -> int:
    """``melecole-blockwise`` / ``python -m melecole.blockwise``. SIGTERM leaves like Ctrl-C (exit 130)."""
    from melecole.blockwise.orchestrate import run_blockwise

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    cfg = load_cfg(args.config, args.opts)
    foreground = args.foreground
    if foreground is None and not args.no_foreground:
        from melecole.inference.outputs import matching_foreground

        foreground = matching_foreground(args.affinities)
        if foreground is not None:  # printed like the run's other lines (run_blockwise reports with print)
            print(f"foreground: {foreground} (infer.py's, same prediction; --no-foreground to segment without)")
    run_blockwise(cfg, args.affinities, args.output, foreground_url=foreground, **blockwise_keywords(args))
    return 0
