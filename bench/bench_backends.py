"""Forward backends on CPU: throughput and agreement of torch eager, onnxruntime, openvino (and variants).

Run (through /work/notes/quiet.sh on the shared box)::

    python bench/bench_backends.py --threads 2 [--checkpoint run/checkpoints/last.pt]
        [--windows 24x64x64 24x128x128 32x256x256] [--batches 1 2 4] [--repeats 2]
        [--backends torch torch-cl3d onnxruntime openvino] [--compile]

Per window size and backend: the forward of one batch of windows as sliding-window prediction calls
it (:mod:`melecole.inference.backends`: input conversion and outputs back to torch included), on a
real EM crop. Reported: Mvoxel/s = output voxels of the whole windows per second, at batch 1 and at
the backend's best batch; the ratio to torch eager measured in the same run (interleaved rounds, best
of ``--repeats`` per backend); max |affinity - torch's| and max |foreground - torch's| over the
measured batches (affinities from the embeddings as inference computes them); the one-off build time
(ONNX export + session/compile; torch.compile: the first call).

Extra rows: ``torch-cl3d`` = eager with channels-last 3D weights and input; ``torch-compile`` (with
``--compile``) = torch.compile(model) in its default mode.
"""

from __future__ import annotations

import argparse
import copy
import glob
import time
from pathlib import Path

import h5py
import numpy as np
import torch

FALLBACK_CHECKPOINT = "/work/bench/ckpt/medulla-UNet3D-20261203-154553/checkpoints/last.pt"
DEFAULT_RAW = "/work/shared/data/medulla/train/medulla_train.hdf"


def _default_checkpoint() -> str:
    for pattern in ("/work/runs/fib-gala/*/checkpoints/final.pt", "/work/runs/fib-gala/*/checkpoints/last.pt"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    return FALLBACK_CHECKPOINT


def _windows_of_raw(path: str, window: tuple[int, ...], count: int) -> torch.Tensor:
    """(count, 1, *window) float32 in [0, 1]: corner crops of a real volume, symmetric-padded when smaller."""
    file_name, _, key = path.partition(":")
    with h5py.File(file_name, "r") as handle:
        volume = handle[key or "volume"]
        crop = np.asarray(volume[tuple(slice(0, min(size, length)) for size, length in zip(volume.shape, window))])
    crop = np.pad(crop, [(0, length - size) for size, length in zip(crop.shape, window)], mode="symmetric")
    # Different windows per batch element: the crop rolled in x.
    crops = np.stack([np.roll(crop, 7 * index, axis=-1) for index in range(count)])
    return torch.from_numpy(crops.astype(np.float32) / 255.0)[:, None]


def _runners(model, names, window, threads, compile_model):
    """name -> (forward(batch) -> dict, build seconds)."""
    from melecole.inference.backends import build_backend

    runners = {}
    for name in names:
        start = time.perf_counter()
        if name == "torch-cl3d":
            channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
            forward = lambda batch, net=channels_last: net(batch.contiguous(memory_format=torch.channels_last_3d))  # noqa: E731
        else:
            forward = build_backend(name, model, window, device="cpu", threads=threads)
        runners[name] = [forward, time.perf_counter() - start]
    if compile_model:
        runners["torch-compile"] = [torch.compile(copy.deepcopy(model)), None]
    return runners


def _affinities(outputs, offsets, delta_d, norm):
    from melecole.inference.affinities import affinities_tensor

    embedding, foreground = outputs["embedding"].float(), outputs["foreground"].float()
    return affinities_tensor(embedding, offsets, delta_d, norm), torch.sigmoid(foreground)


def _measure_batch(runners, batch, repeats, offsets, delta_d, norm) -> dict[str, tuple[float, float, float]]:
    """name -> (best seconds per call, max |affinity diff|, max |foreground diff|) on one batch."""
    results, reference = {}, None
    for name, runner in runners.items():  # warm-up call, also the agreement check
        start = time.perf_counter()
        affinities, foreground = _affinities(runner[0](batch), offsets, delta_d, norm)
        if runner[1] is None:  # torch.compile compiles on the first call
            runner[1] = time.perf_counter() - start
        if reference is None:
            reference = (affinities, foreground)
        results[name] = [float("inf"), float((affinities - reference[0]).abs().max()),
                         float((foreground - reference[1]).abs().max())]  # fmt: skip
    for _ in range(repeats):  # interleaved rounds: the machine's load drifts alike for every backend
        for name, runner in runners.items():
            start = time.perf_counter()
            runner[0](batch)
            results[name][0] = min(results[name][0], time.perf_counter() - start)
    return {name: tuple(values) for name, values in results.items()}


def _table_rows(window, runners, per_batch) -> list[str]:
    voxels = int(np.prod(window))
    torch_best = max(batch * voxels / per_batch[batch]["torch"][0] for batch in per_batch)
    rows = []
    for name, (_, build) in runners.items():
        speeds = {batch: batch * voxels / per_batch[batch][name][0] / 1e6 for batch in per_batch}
        best = max(speeds, key=speeds.get)
        ratio_1 = speeds[1] / (voxels / per_batch[1]["torch"][0] / 1e6) if 1 in speeds else float("nan")
        affinity = max(per_batch[batch][name][1] for batch in per_batch)
        foreground = max(per_batch[batch][name][2] for batch in per_batch)
        rows.append(
            f"| {'x'.join(map(str, window))} | {name} | {build:.1f} | {speeds.get(1, float('nan')):.3f} | "
            f"{ratio_1:.2f} | {speeds[best]:.3f} (B={best}) | {speeds[best] * 1e6 / torch_best:.2f} | "
            f"{affinity:.1e} | {foreground:.1e} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the newest fib-gala run, else " + FALLBACK_CHECKPOINT)
    parser.add_argument("--raw", default=DEFAULT_RAW, help="HDF5 file[:key] of real EM (default key: volume)")
    parser.add_argument("--windows", nargs="+", default=["24x64x64", "24x128x128", "32x256x256"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--backends", nargs="+", default=["torch", "torch-cl3d", "onnxruntime", "openvino"])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (default mode)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.backends[0] != "torch":
        parser.error("--backends must start with torch (the reference)")

    from melecole.engine.checkpoint import build_model_from_checkpoint

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or _default_checkpoint()
    model, cfg, _ = build_model_from_checkpoint(checkpoint)
    offsets = [tuple(offset) for offset in cfg.INFERENCE.OFFSETS]
    print(f"checkpoint {checkpoint}; raw {args.raw}; torch {torch.__version__}, {args.threads} threads")
    print("| window | backend | build s | B=1 Mvox/s | ratio B=1 | best batch Mvox/s | ratio best "
          "| max abs aff diff | max abs fg diff |\n|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for text in args.windows:
            window = tuple(int(size) for size in text.split("x"))
            runners = _runners(model, args.backends, window, args.threads, args.compile)
            per_batch = {}
            for batch_size in args.batches:
                batch = _windows_of_raw(args.raw, window, batch_size)
                per_batch[batch_size] = _measure_batch(
                    runners, batch, args.repeats, offsets, float(cfg.LOSS.DELTA_D), cfg.LOSS.NORM
                )
            print("\n".join(_table_rows(window, runners, per_batch)), flush=True)
    print(f"(ratios: to torch eager at batch 1 / at torch's best batch; {Path(__file__).name}, best of "
          f"{args.repeats} interleaved repeats after one warm-up call)")


if __name__ == "__main__":
    main()
