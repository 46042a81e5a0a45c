"""Blockwise segmentation of infer.py's own stored outputs: wall time of the command and of its passes.

Run: ``python bench/bench_blockwise_real.py --affinities RUN/results/last/val_affinities.hdf:affinities
--config configs/medulla-UNet3D.yaml [--block 32 128 128] [--fragments mws watershed] [--workers 2]
[--repeat 2] [--reference DIR] [--no-foreground]``

Each run is ``python -m melecole.blockwise`` in a subprocess (start-up, checks, dask cluster, the four
passes, commit: what a user waits for). Printed per run: wall seconds and Mvoxel/s, the passes' own
seconds and Mvoxel/s (the sum of the "<pass>: N blocks in S s" lines), the rest (start-up, cluster,
commit), and whether the labels equal those of ``--reference`` (a folder of earlier outputs, one
``<fragments>.zarr`` per mode: the same input must give the same labels on every code version).
Also the read of one padded block of the affinities (the fragments pass's input), best of 3.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PASS_LINE = re.compile(r"^(\w+): (\d+) blocks in ([0-9.]+) s")


def run_once(args: argparse.Namespace, fragments: str, output: Path) -> tuple[float, dict[str, float], str]:
    """(wall seconds, {pass: seconds}, output) of one ``python -m melecole.blockwise`` run."""
    command = [
        sys.executable, "-m", "melecole.blockwise", "--affinities", args.affinities, "--output", str(output),
        "--config", args.config, "--workers", str(args.workers), "--fragments", fragments, "--overwrite",
        *(["--block", *map(str, args.block)] if args.block else []),
        *(["--no-foreground"] if args.no_foreground else []), "LOG.PROGRESS_BAR", "False",
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"run failed ({process.returncode}):\n{process.stdout}\n{process.stderr}")
    passes = {m.group(1): float(m.group(3)) for m in map(PASS_LINE.match, process.stdout.splitlines()) if m}
    return wall, passes, process.stdout


def read_block_seconds(url: str, block: list[int] | None, halo: tuple[int, int, int] = (4, 10, 10)) -> float:
    """Best of 3 reads of block 0 of ``url`` with the halo, as the fragments pass reads it (all channels)."""
    from melecole.io.volumes import open_volume

    volume = open_volume(url)
    shape = volume.shape[1:]
    block = block or [64, 256, 256]
    box = (slice(None),) + tuple(slice(0, min(s, b + h)) for s, b, h in zip(shape, block, halo))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        volume[box]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--affinities", required=True, help="infer.py's stored affinities, file.hdf:key or zarr")
    parser.add_argument("--config", required=True)
    parser.add_argument("--block", type=int, nargs=3, help="--block (default: the config's)")
    parser.add_argument("--fragments", nargs="+", default=["mws", "watershed"], choices=["mws", "watershed"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-foreground", action="store_true",
                        help="segment without infer.py's stored foreground (taken by default since 2026-12-03)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (the best is printed)")
    parser.add_argument("--reference", type=Path, help="folder of <fragments>.zarr labels to compare with")
    parser.add_argument("--keep", type=Path, help="write the outputs here as <fragments>.zarr (default: temporary)")
    args = parser.parse_args()
    from melecole.io.volumes import open_volume

    shape = open_volume(args.affinities).shape
    voxels = int(np.prod(shape[1:]))
    block = "config" if not args.block else "x".join(map(str, args.block))
    print(
        f"{args.affinities}: {list(shape)} {open_volume(args.affinities).dtype}, block {block}, "
        f"{args.workers} workers; read of block 0 + halo: {read_block_seconds(args.affinities, args.block):.2f} s"
    )
    print("| fragments | wall s | Mvoxel/s wall | passes s | Mvoxel/s in passes | rest s | per pass s | labels |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for fragments in args.fragments:
            output = folder / f"{fragments}.zarr"
            runs = [run_once(args, fragments, output) for _ in range(args.repeat)]
            wall, passes, _ = min(runs, key=lambda run: run[0])
            inside = sum(passes.values())
            same = ""
            if args.reference is not None and (args.reference / f"{fragments}.zarr").exists():
                equal = np.array_equal(
                    open_volume(str(output)).read(), open_volume(str(args.reference / f"{fragments}.zarr")).read()
                )
                same = "identical" if equal else "DIFFERENT"
            per_pass = ", ".join(f"{name} {seconds:.1f}" for name, seconds in passes.items())
            print(
                f"| {fragments} | {wall:.1f} | {voxels / wall / 1e6:.2f} | {inside:.1f} | {voxels / inside / 1e6:.2f} "
                f"| {wall - inside:.1f} | {per_pass} | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
