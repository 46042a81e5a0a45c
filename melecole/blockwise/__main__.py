"""Segment stored affinities block by block on dask (large volumes).

    python -m melecole.blockwise --affinities aff.zarr --output seg.zarr --config configs/X.yaml
    python -m melecole.blockwise --affinities pred.hdf:affinities --foreground pred.hdf:foreground \
        --output seg.zarr:segmentation --config X.yaml --block 64 256 256 --workers 8 --fragments watershed
    python -m melecole.blockwise ... --scheduler tcp://10.0.0.1:8786     # an existing dask cluster
    python -m melecole.blockwise ... --resume                           # finish an interrupted run

Offsets come from INFERENCE.OFFSETS (the affinities may come from any network); options from
BLOCKWISE.* (see melecole/config/defaults.py). Output: uint64 zarr, 0 only where no segment is near.
"""

from __future__ import annotations

import argparse
import signal

from melecole.blockwise.api import add_blockwise_arguments
from melecole.config import load_cfg
from melecole.utils.cli import add_config_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melecole.blockwise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--affinities", required=True, metavar="URL", help="(C, Z, Y, X): file.hdf:key, x.zarr, ...")
    parser.add_argument("--foreground", metavar="URL", help="optional (Z, Y, X) foreground probability")
    parser.add_argument("--output", required=True, metavar="URL", help="zarr output: x.zarr or x.zarr:key")
    add_blockwise_arguments(parser)
    add_config_arguments(parser)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C (the cluster is closed on the way out)


@run_cli
def main(argv: list[str] | None = None) -> int:
    from melecole.blockwise.api import run_from_args

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    cfg = load_cfg(args.config, args.opts)
    run_from_args(cfg, args, args.affinities, args.output, foreground_url=args.foreground)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
