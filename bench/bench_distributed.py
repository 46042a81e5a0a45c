"""Training throughput with 1 and 2 processes through melecole/train_distributed.py.

Run: ``python bench/bench_distributed.py [--config configs/synthetic-UNet3D.yaml] [--iterations 30]
[--setups 1x1 1x2 2x1] [KEY VALUE ...]``.

Each setup PxT is one short run of the real script with P processes of T torch threads each
(OMP_NUM_THREADS=T; HARDWARE.DEVICE cpu, NUM_WORKERS 0, no validation, images or intermediate
checkpoints). Iterations/s is the training loop's rate as rank 0 logs it (process start-up
excluded); samples/s = iterations/s x OPTIM.BATCH_SIZE (per process) x P. With as many cores as
P x T (1x2 versus 2x1 on 2 cores) the ratio shows the cost of distribution, not a speed-up. When
DATASET.DATA_ROOT/train is missing, the synthetic set is generated first
(python -m melecole.data.synthetic).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"trained (\d+) iterations in [\d.]+ s \(([\d.]+) it/s\)")


def run_training(
    config: str, processes: int, threads: int, iterations: int, output: Path, overrides: list[str]
) -> float:
    """Iterations/s of one train_distributed.py run with ``processes`` processes of ``threads`` threads."""
    command = [
        sys.executable,
        "melecole/train_distributed.py",
        "--config",
        config,
        "HARDWARE.NUM_GPUS",
        str(processes),
        "HARDWARE.DEVICE",
        "cpu",
        "HARDWARE.NUM_WORKERS",
        "0",
        "OPTIM.TOTAL_ITER",
        str(iterations),
        "LOG.OUTPUT_PATH",
        str(output),
        "LOG.VAL_FREQUENCY",
        "0",
        "LOG.IMAGE_FREQUENCY",
        "0",
        "LOG.CHECKPOINT_FREQUENCY",
        str(10 * iterations),
        "LOG.LOG_FREQUENCY",
        str(iterations),
        "LOG.PROGRESS_BAR",
        "False",
        *overrides,
    ]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"training with {processes} process(es) failed:\n{result.stderr[-2000:]}")
    match = RATE.search(result.stdout)
    if match is None:
        raise SystemExit(f"no 'trained N iterations' line in the output:\n{result.stdout[-2000:]}")
    return float(match.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic-UNet3D.yaml")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument(
        "--setups", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS per run, e.g. 2x1"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE")
    args = parser.parse_args()

    from melecole.config import load_cfg

    cfg = load_cfg(REPO / args.config, args.opts)
    if not (REPO / cfg.DATASET.DATA_ROOT / cfg.DATASET.TRAIN_SPLIT).is_dir():
        print(f"generating the synthetic dataset in {cfg.DATASET.DATA_ROOT}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "melecole.data.synthetic", "--out", cfg.DATASET.DATA_ROOT, "--seed", "0"],
            cwd=REPO,
            check=True,
        )
    print(
        f"config {args.config}, {args.iterations} iterations, OPTIM.BATCH_SIZE {cfg.OPTIM.BATCH_SIZE} per "
        f"process, MODEL.INPUT_SIZE {list(cfg.MODEL.INPUT_SIZE)}, {os.cpu_count()} CPU cores"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="melecole-bench-") as output:
        for setup in args.setups:
            processes, threads = (int(part) for part in setup.lower().split("x"))
            start = time.perf_counter()
            rate = run_training(args.config, processes, threads, args.iterations, Path(output), args.opts)
            samples = rate * cfg.OPTIM.BATCH_SIZE * processes
            rows.append((processes, threads, rate, samples, time.perf_counter() - start))
    base = rows[0][3]
    print("| processes | threads each | iterations/s | samples/s | samples/s vs first row | wall s (with start-up) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for processes, threads, rate, samples, wall in rows:
        print(f"| {processes} | {threads} | {rate:.2f} | {samples:.2f} | {samples / base:.2f}x | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
