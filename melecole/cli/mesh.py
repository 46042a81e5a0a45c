"""Neuroglancer meshes of a segmentation: a precomputed segmentation layer with meshes, block by block.

    python -m melecole.mesh results/val_segmentation.hdf --output val_meshes --resolution 10 10 10
    python -m melecole.mesh seg.zarr:segmentation --output /data/seg_meshes --workers 2 --block 64 256 256
    python view.py --gt GT.hdf --segmentation val_meshes          # shows the meshes in the 3D panel

SEG: file.hdf[:key] (default key 'segmentation'), x.zarr[:key], x.zarr/key or precomputed://...; integer
labels, 0 = background (no mesh). The voxel size comes from the input's metadata or --resolution (nm).
Blocks run on dask (--workers, default BLOCKWISE.WORKERS); --workers 1 or a one-block volume runs in this
process. The output folder is written beside its final path and renamed at the end; an existing output is
replaced only with --overwrite and only when MeLeCoLe wrote it. Format: docs/meshes.md.
"""

from __future__ import annotations

import argparse
import signal

from melecole.config import load_cfg
from melecole.utils.cli import run_cli

__all__ = ["build_parser", "main"]

ZYX = ("Z", "Y", "X")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melecole.mesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("segmentation", metavar="SEG", help="(Z, Y, X) integer labels: file.hdf[:key], x.zarr[:key], precomputed://")
    add("--output", required=True, metavar="DIR", help="precomputed layer folder to write (labels + meshes)")
    add("--resolution", type=float, nargs=3, metavar=ZYX, help="voxel size in nm (default: the input's metadata)")
    add("--block", type=int, nargs=3, metavar=ZYX, help="block shape (default BLOCKWISE.BLOCK_SHAPE)")
    add("--workers", type=int, help="dask LocalCluster processes (default BLOCKWISE.WORKERS; 1 = this process)")
    add("--simplify", type=int, default=0, metavar="FACTOR",
        help="zmesh reduction factor: 0 = exact marching cubes (default); 10 keeps ~1/10 of the faces")
    add("--max-error", type=float, metavar="NM", help="how far --simplify may move the surface (default: 1 voxel)")
    add("--overwrite", action="store_true", help="replace an existing output that MeLeCoLe wrote")
    add("--config", help="YACS yaml whose BLOCKWISE.BLOCK_SHAPE / WORKERS / LOG.PROGRESS_BAR are the defaults")
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C (the temporary layer is removed on the way out)


@run_cli
def main(argv: list[str] | None = None) -> int:
    """``melecole-mesh`` / ``python -m melecole.mesh``. SIGTERM leaves like Ctrl-C (exit 130)."""
    from melecole.mesh import mesh_segmentation

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    cfg = load_cfg(args.config)
    mesh_segmentation(
        args.segmentation,
        args.output,
        resolution=args.resolution,
        block_shape=args.block or cfg.BLOCKWISE.BLOCK_SHAPE,
        workers=args.workers if args.workers is not None else cfg.BLOCKWISE.WORKERS,
        simplify=args.simplify,
        max_error=args.max_error,
        overwrite=args.overwrite,
        progress=cfg.LOG.PROGRESS_BAR,
    )
    return 0
