"""Repeats the distributed end-to-end sequence and counts failures (not part of CI).

Run: ``python bench/stress_distributed.py [--runs 30] [--iterations 3]``.

Each run, on a tiny volume in a temporary folder:
  1. python melecole/train_distributed.py --config tiny.yaml HARDWARE.NUM_GPUS 2 HARDWARE.DEVICE cpu
  2. python melecole/train.py --config tiny.yaml --supervised_checkpoint <run>/checkpoints/last.pt
  3. python infer.py --split val --config tiny.yaml --checkpoint <that last.pt>
A run fails when a command exits non-zero (a worker killed by SIGABRT while exiting counts) or the
distributed run leaves no last.pt. Prints one line per run and the number of failed runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from melecole.config import load_cfg

REPO = Path(__file__).resolve().parents[1]


def write_tiny_dataset(root: Path) -> None:
    """train/ and val/ volumes (12, 40, 40): boxes of distinct ids split by 1-voxel boundaries."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices((12, 40, 40))
    labels = (1 + (z // 4) * 100 + (y // 8) * 10 + x // 8).astype(np.uint32)
    labels[(y % 8 == 0) | (x % 8 == 0)] = 0
    for split in ("train", "val"):
        noise = rng.integers(0, 30, labels.shape, dtype=np.uint8)
        raw = np.where(labels > 0, 180, 40).astype(np.uint8) + noise
        (root / split).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / split / f"{split}.hdf", "w") as handle:
            handle["volume"] = raw
            handle["labels"] = labels


def write_tiny_config(folder: Path, iterations: int) -> Path:
    write_tiny_dataset(folder / "data")
    opts = [
        "DATASET.DATA_ROOT", str(folder / "data"), "MODEL.INPUT_SIZE", "[8, 32, 32]",
        "MODEL.FILTERS", "[4, 8]", "MODEL.POOL_Z", "[False]", "MODEL.NORM_GROUPS", "2",
        "MODEL.EMBEDDING_DIMENSION", "4", "OPTIM.TOTAL_ITER", str(iterations), "OPTIM.BATCH_SIZE", "1",
        "HARDWARE.NUM_WORKERS", "0", "HARDWARE.DEVICE", "cpu", "LOG.OUTPUT_PATH", str(folder / "runs"),
        "LOG.CHECKPOINT_FREQUENCY", "2", "LOG.VAL_FREQUENCY", "2", "LOG.VAL_PATCHES", "1",
        "LOG.IMAGE_FREQUENCY", "0", "LOG.PROGRESS_BAR", "False",
        "INFERENCE.WINDOW_SIZE", "[8, 32, 32]", "INFERENCE.STRIDE", "[4, 16, 16]",
    ]
    config = folder / "tiny.yaml"
    config.write_text(load_cfg(None, opts).dump())
    return config


def run(command: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=environment)


def one_run(index: int, folder: Path, config: Path, environment: dict[str, str]) -> str | None:
    """The three steps; None on success, else what failed."""
    runs = folder / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    result = run(["melecole/train_distributed.py", "--config", str(config), "HARDWARE.NUM_GPUS", "2",
                  "HARDWARE.DEVICE", "cpu", "LOG.RUN_NAME", f"distributed{index:02d}"], environment)
    if result.returncode != 0:
        return f"train_distributed exit {result.returncode}: {result.stderr.strip()[-400:]}"
    new = sorted(set(runs.iterdir()) - before)
    if len(new) != 1 or not (new[0] / "checkpoints" / "last.pt").is_file():
        return f"train_distributed made {len(new)} run folders / no last.pt"
    last = new[0] / "checkpoints" / "last.pt"
    result = run(["melecole/train.py", "--config", str(config), "--supervised_checkpoint", str(last),
                  "OPTIM.TOTAL_ITER", "1", "LOG.RUN_NAME", f"fine-tune{index:02d}"], environment)
    if result.returncode != 0:
        return f"train.py exit {result.returncode}: {result.stderr.strip()[-400:]}"
    command = ["infer.py", "--split", "val", "--config", str(config), "--checkpoint", str(last)]
    result = run(command, environment)
    if result.returncode != 0:
        return f"infer.py exit {result.returncode}: {result.stderr.strip()[-400:]}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=3, help="OPTIM.TOTAL_ITER of the distributed run")
    args = parser.parse_args()
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="melecole-stress-") as temporary:
        folder = Path(temporary)
        config = write_tiny_config(folder, args.iterations)
        for index in range(args.runs):
            start = time.perf_counter()
            problem = one_run(index, folder, config, environment)
            failures += problem is not None
            print(f"run {index + 1:2d}/{args.runs}: {'FAILED ' + problem if problem else 'ok'} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{failures} failed of {args.runs} runs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
