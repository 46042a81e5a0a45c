"""Peak memory of the real CLI ``infer.py --affinities-only`` for a volume and one 8x larger.

Run: ``python bench/bench_infer_stores.py [--base 32 128 128] [--chunk 16 64 64] [--threads 1]``.
A tiny config and checkpoint (UNet3D filters (4, 8), window (8, 32, 32), 12 default offsets) are
written to a temporary folder with the synthetic uint8 inputs of bench_chunked_io.py (as
precomputed and as zarr, written block by block). Each run is a fresh ``python infer.py
--affinities-only`` subprocess, precomputed -> zarr and zarr -> precomputed, with the default
(exact) halo; its peak RSS is the child's own ``ru_maxrss`` from ``os.wait4``. Prints a markdown
table and the 8x / 1x peak ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_chunked_io import make_input

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "MODEL.INPUT_SIZE",
    "[8, 32, 32]",
    "MODEL.FILTERS",
    "[4, 8]",
    "MODEL.POOL_Z",
    "[False]",
    "MODEL.NORM",
    "none",
    "MODEL.EMBEDDING_DIMENSION",
    "8",
    "HARDWARE.DEVICE",
    "cpu",
    "LOG.PROGRESS_BAR",
    "False",
]


def write_checkpoint(folder: Path) -> tuple[Path, Path]:
    """The tiny config yaml and a checkpoint of a randomly initialised model (seed 0)."""
    import torch

    from melecole.config import load_cfg
    from melecole.engine.checkpoint import save_checkpoint
    from melecole.models import build_model

    cfg = load_cfg(None, TINY)
    config = folder / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=0)
    return config, checkpoint


def run_cli(arguments: list[str], threads: int) -> dict:
    """Runs ``infer.py`` in a child process; its exit status, peak RSS (MiB) and wall time."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "infer.py", *arguments], cwd=REPO_ROOT, env=environment, stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    if child.returncode:
        raise RuntimeError(f"infer.py failed ({child.returncode}): {errors.strip()}")
    blocks = int(printed.split(" blocks (")[0].rsplit(" ", 1)[1])
    return {"peak_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start, "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, nargs=3, default=[32, 128, 128], help="smaller volume (z, y, x)")
    parser.add_argument("--chunk", type=int, nargs=3, default=[16, 64, 64], help="--chunk of infer.py (z, y, x)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per run")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_stores_") as name:
        folder = Path(name)
        config, checkpoint = write_checkpoint(folder)
        common = ["--chunk", *map(str, args.chunk), "--config", str(config), "--checkpoint", str(checkpoint)]
        for factor in (1, 2):
            shape = [s * factor for s in args.base]
            inputs = {
                "precomputed": f"precomputed://file://{folder}/raw{factor}",
                "zarr": f"{folder}/raw{factor}.zarr",
            }
            for url in inputs.values():
                make_input(url, shape, [min(64, s) for s in shape])
            outputs = {
                "zarr": f"{folder}/aff{factor}.zarr",
                "precomputed": f"precomputed://file://{folder}/aff{factor}",
            }
            for source, sink in (("precomputed", "zarr"), ("zarr", "precomputed")):
                arguments = ["--affinities-only", "--input", inputs[source], "--output-affinities", outputs[sink]]
                result = run_cli(arguments + common, args.threads)
                rows.append((f"{source} -> {sink}", shape, result))
    print(
        f"infer.py --affinities-only --chunk {' '.join(map(str, args.chunk))}, default (exact) halo, "
        f"window (8, 32, 32), 12 offsets, UNet3D filters (4, 8), {args.threads} thread(s), float32 output\n"
    )
    print("| run | shape (z, y, x) | voxels | blocks | peak RSS (MiB) | s |")
    print("|---|---|---|---|---|---|")
    for name, shape, r in rows:
        voxels = shape[0] * shape[1] * shape[2]
        print(
            f"| {name} | {tuple(shape)} | {voxels / 1e6:.2f} M | {r['blocks']} | {r['peak_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    print()
    for name in sorted({row[0] for row in rows}):
        small, large = [r for n, _, r in rows if n == name]
        print(f"{name}: peak RSS 8x / 1x = {large['peak_mb'] / small['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
