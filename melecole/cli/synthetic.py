"""``python -m melecole.data.synthetic``: generate the synthetic anisotropic EM dataset.

    python -m melecole.data.synthetic --out dataset/synthetic --seed 0 [--small] [--baseline]

The generator is :mod:`melecole.data.synthetic`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from melecole.data.synthetic import (
    DEFAULT_DEFECT_SPLITS,
    DEFAULT_SHAPE,
    SMALL_SHAPE,
    check_output,
    generate_dataset,
    threshold_baseline,
)
from melecole.data.volume import read_volume
from melecole.utils.cli import run_cli

__all__ = ["build_parser", "main"]

logger = logging.getLogger("melecole.data.synthetic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate the synthetic anisotropic EM dataset.")
    parser.add_argument("--out", default="dataset/synthetic", help="dataset root (gets train/ val/ test/)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--small", action="store_true", help=f"tiny volumes {SMALL_SHAPE} for tests")
    parser.add_argument("--no-defects", action="store_true", help="no section defects, not even in train")
    parser.add_argument("--baseline", action="store_true", help="log the naive threshold baseline on val")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing dataset")
    return parser


@run_cli
def main(argv: list[str] | None = None) -> int:
    """CLI: python -m melecole.data.synthetic --out dataset/synthetic --seed 0 [--small]."""
    args = build_parser().parse_args(argv)
    check_output(args.out, args.seed, overwrite=args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    shape = SMALL_SHAPE if args.small else DEFAULT_SHAPE
    paths = generate_dataset(
        args.out, args.seed, shape=shape, defect_splits=() if args.no_defects else DEFAULT_DEFECT_SPLITS
    )
    logger.info("wrote %d volumes to %s in %.1f s", len(paths), args.out, time.perf_counter() - start)
    if args.baseline:
        for path in paths:
            if path.parent.name == "val":
                volume = read_volume(path)
                scores = threshold_baseline(volume.raw, volume.labels)
                logger.info("naive baseline on %s: %s", path, json.dumps(scores))
    return 0
