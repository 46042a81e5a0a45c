"""Sliding-window inference: throughput against the bare model, and memory against volume size.

Run: ``python bench/bench_infer.py [--shape 32 256 256] [--threads 1] [--device cpu]``.

Throughput: ``predict_volume`` (forward + per-window affinities + blending) against the bare
model forward on exactly the same windows and batches; the ratio bare / sliding is the fraction
of the time spent in the network (target >= 0.8). CPU time is reported next to wall time because
wall time on a shared machine mostly measures the other processes.

Memory: ``predict_volume`` on the volume and on one 4x larger (y and x doubled), each in its own
process; the peak RSS above the loaded model and raw, minus the output arrays ((C + 1) float32
volumes), should stay about constant (windows are streamed), not grow 4x.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODEL_OPTS = [
    "MODEL.INPUT_SIZE", "[8, 64, 64]", "MODEL.FILTERS", "[8, 16, 32]", "MODEL.POOL_Z", "[False, False]",
    "MODEL.EMBEDDING_DIMENSION", "16",
]  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _setup(shape: tuple[int, int, int], device: str):
    from melecole.config import load_cfg
    from melecole.inference import resolve_windows
    from melecole.models import build_model

    cfg = load_cfg(None, MODEL_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    raw = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    return cfg, model, raw, resolve_windows(cfg)


def _predict(cfg, model, raw, windows, device: str) -> tuple[np.ndarray, np.ndarray]:
    from melecole.inference import predict_volume

    window, stride, margin = windows
    return predict_volume(
        model, raw, window=window, stride=stride, margin=margin, offsets=cfg.INFERENCE.OFFSETS,
        delta_d=cfg.LOSS.DELTA_D, norm=cfg.LOSS.NORM, blending=cfg.INFERENCE.BLENDING,
        batch_size=cfg.INFERENCE.BATCH_SIZE, device=device, progress=False,
    )  # fmt: skip


def _bare(model, raw, windows, batch_size: int, device: str) -> int:
    """The model forward on the windows predict_volume uses; returns the number of windows."""
    from melecole.inference import window_starts

    window, stride, _ = windows
    starts = [window_starts(s, w, t) for s, w, t in zip(raw.shape, window, stride)]
    positions = list(itertools.product(*starts))
    with torch.inference_mode():
        for first in range(0, len(positions), batch_size):
            crops = np.stack([
                raw[z : z + window[0], y : y + window[1], x : x + window[2]]
                for z, y, x in positions[first : first + batch_size]
            ])  # fmt: skip
            inputs = torch.from_numpy(crops).to(device).float().mul_(1 / 255)[:, None]
            output = model(inputs)
            output["embedding"].sum().item()  # synchronise (CUDA)
    return len(positions)


def _timed(function) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu


def memory_stage(shape: tuple[int, int, int], device: str) -> dict:
    """Peak RSS of one predict_volume above the loaded model and raw (this process only)."""
    cfg, model, raw, windows = _setup(shape, device)
    window = windows[0]
    _predict(cfg, model, raw[: window[0], : window[1], : window[2]].copy(), windows, device)  # lazy init
    baseline = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    affinities, foreground = _predict(cfg, model, raw, windows, device)
    peak = (_status_kib("VmHWM") - baseline) * 1024
    return {"peak": peak, "outputs": affinities.nbytes + foreground.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 256, 256], metavar=("Z", "Y", "X"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-stage", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_stage:
        print(json.dumps(memory_stage(tuple(args.memory_stage), args.device)))
        return

    shape = tuple(args.shape)
    cfg, model, raw, windows = _setup(shape, args.device)
    window, stride, margin = windows
    _bare(model, raw[: window[0], : window[1], : window[2]], windows, 1, args.device)  # warm-up
    count = 0

    def bare() -> None:
        nonlocal count
        count = _bare(model, raw, windows, cfg.INFERENCE.BATCH_SIZE, args.device)

    bare_wall, bare_cpu = _timed(bare)
    sliding_wall, sliding_cpu = _timed(lambda: _predict(cfg, model, raw, windows, args.device))
    voxels = int(np.prod(shape))
    print(
        f"volume {shape}, window {window}, stride {stride}, margin {margin}, {count} windows, "
        f"batch {cfg.INFERENCE.BATCH_SIZE}, {args.device}, {args.threads} thread(s)"
    )
    print(f"\n{'':<16} {'wall s':>8} {'CPU s':>8} {'Mvoxel/s (wall)':>16} {'Mvoxel/s (CPU)':>15}")
    for name, wall, cpu in (("bare forward", bare_wall, bare_cpu), ("predict_volume", sliding_wall, sliding_cpu)):
        print(f"{name:<16} {wall:>8.2f} {cpu:>8.2f} {voxels / wall / 1e6:>16.3f} {voxels / cpu / 1e6:>15.3f}")
    print(
        f"throughput ratio bare / sliding: {bare_wall / sliding_wall:.2f} wall, "
        f"{bare_cpu / sliding_cpu:.2f} CPU (target >= 0.8)"
    )

    large = (shape[0], shape[1] * 2, shape[2] * 2)
    print(f"\n{'volume':<16} {'peak MiB':>9} {'outputs MiB':>12} {'peak - outputs MiB':>19}")
    for size in (shape, large):
        command = [sys.executable, __file__, "--memory-stage", *map(str, size), "--threads", str(args.threads)]
        command += ["--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"{str(size):<16} {row['peak'] / 2**20:>9.0f} {row['outputs'] / 2**20:>12.0f} "
            f"{(row['peak'] - row['outputs']) / 2**20:>19.0f}"
        )


if __name__ == "__main__":
    main()
