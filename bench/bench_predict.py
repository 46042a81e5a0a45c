"""Prediction speed and quality per window / TTA setting (issue 20), and the border effect of windows.

Tables (timings: best of ``--repeats``; run under /work/notes/quiet.sh on the shared machine):

- ``bare``: the bare model forward (torch, no affinities, no blending) in Mvoxel/s at a few windows and
  at the largest window the planner allows for a 64x512x512 volume (the denominator of ``ratio``).
- ``speed`` / ``quality``: per dataset (medulla/val, fib-gala/val: real data with labels; ``synthetic``:
  a random 64x512x512 uint8 volume, speed only) x setting x backend: the concrete plan (window,
  stride, windows, batch), prediction Mvoxel/s (output voxels / wall seconds of
  ``predict_volume``), ratio to the bare forward at the largest window, and for labelled volumes VI
  split / merge / total (bits) and ARAND of the segmentation ``infer.py`` makes from those
  affinities (float16 storage, ``segment_affinities`` with the config's segmentation options).
- ``border``: mean |affinity difference| (all channels, pairs inside the window) and |foreground
  difference| between a small window and one window covering the whole volume, by the voxel's
  distance to the small window's edge (in y/x with z far from the edge, and in z with y/x far),
  over several small-window positions away from the volume border.

    /work/notes/quiet.sh .venv/bin/python bench/bench_predict.py --sections bare speed quality \\
        --checkpoint-medulla CKPT --checkpoint-fib-gala CKPT [--settings old new ...] [--datasets ...]
    .venv/bin/python bench/bench_predict.py --sections border --checkpoint-medulla CKPT
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIGS = {"medulla": "configs/medulla-UNet3D.yaml", "fib-gala": "configs/fib-gala-UNet3D.yaml",
           "synthetic": "configs/fib-gala-UNet3D.yaml"}  # fmt: skip
SYNTHETIC_SHAPE = (64, 512, 512)
OLD = {"WINDOW_SIZE": [24, 64, 64], "STRIDE": [12, 32, 32], "OVERLAP": [], "TTA": "yx", "BATCH_SIZE": 4}
AUTO = {"WINDOW_SIZE": "auto", "STRIDE": [], "BATCH_SIZE": 0}
# name -> INFERENCE overrides (on top of the dataset's config; MARGIN is the config's unless given).
SETTINGS: dict[str, dict[str, Any]] = {
    "old": OLD,
    "old-notta": {**OLD, "TTA": "none"},
    "24x128x128": {"WINDOW_SIZE": [24, 128, 128], "STRIDE": [12, 96, 96], "OVERLAP": [], "TTA": "none",
                   "BATCH_SIZE": 1},
    "auto": {**AUTO, "OVERLAP": [], "TTA": "none"},
    "auto-x": {**AUTO, "OVERLAP": [], "TTA": "x"},
    "auto-yx": {**AUTO, "OVERLAP": [], "TTA": "yx"},
    "auto-zyx": {**AUTO, "OVERLAP": [], "TTA": "zyx"},
    # A larger memory budget: fewer, larger windows on volumes bigger than one window.
    "auto-x-4g": {**AUTO, "OVERLAP": [], "TTA": "x", "MEMORY_BUDGET_GB": 4.0},
    # Several windows per volume (a small budget), to see the overlap / margin matter.
    "small-min": {**AUTO, "OVERLAP": [0, 0, 0], "MEMORY_BUDGET_GB": 0.15, "TTA": "none"},
    "small-4x16": {**AUTO, "OVERLAP": [4, 16, 16], "MEMORY_BUDGET_GB": 0.15, "TTA": "none"},
    "small-8x32": {**AUTO, "OVERLAP": [8, 32, 32], "MEMORY_BUDGET_GB": 0.15, "TTA": "none"},
    "small-m0": {**AUTO, "OVERLAP": [0, 0, 0], "MARGIN": [0, 0, 0], "MEMORY_BUDGET_GB": 0.15, "TTA": "none"},
}  # fmt: skip
BARE_WINDOWS = ((24, 64, 64), (24, 128, 128), (32, 256, 256))


THREADS = {"value": 0}  # HARDWARE.NUM_THREADS of every run (--threads; 0 = the config's auto: every core)


def setting_cfg(dataset: str, overrides: dict[str, Any]) -> Any:
    """The dataset's config with INFERENCE overrides, validated and frozen."""
    from melecole.config import load_cfg, validate_cfg

    cfg = load_cfg(CONFIGS[dataset], freeze=False)
    cfg.HARDWARE.NUM_THREADS = THREADS["value"]
    for key, value in overrides.items():
        cfg.INFERENCE[key] = value
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def load_data(dataset: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw uint8, labels or None) of the dataset's val volume, or the synthetic random volume."""
    if dataset == "synthetic":
        return np.random.default_rng(0).integers(0, 256, SYNTHETIC_SHAPE).astype(np.uint8), None
    from melecole.data.volume import list_volumes, read_volume

    cfg = setting_cfg(dataset, {})
    volume = read_volume(list_volumes(cfg.DATASET.DATA_ROOT, "val")[0], cfg.DATASET.RAW_KEY, cfg.DATASET.LABEL_KEY,
                         cfg.DATASET.PADDING)  # fmt: skip
    assert volume.raw.dtype == np.uint8 and volume.raw.shape == volume.labels.shape
    return volume.raw, volume.labels


def load_model(checkpoint: str, cfg: Any) -> torch.nn.Module:
    from melecole.engine.checkpoint import build_model_from_checkpoint

    return build_model_from_checkpoint(checkpoint, cfg)[0]


def bare_forward(model: torch.nn.Module, window: tuple[int, int, int], repeats: int, windows: int = 2) -> float:
    """Bare forward Mvoxel/s at ``window`` (batch 1, ``windows`` windows), best of ``repeats``."""
    inputs = torch.rand(1, 1, *window)
    best = float("inf")
    with torch.inference_mode():
        model(inputs)  # warm-up (allocator, oneDNN primitives)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(windows):
                model(inputs)
            best = min(best, time.perf_counter() - start)
    return windows * float(np.prod(window)) / best / 1e6


def predict_once(model: torch.nn.Module, raw: np.ndarray, cfg: Any, backend: str | None):
    """(affinities, foreground, seconds, planned options) of one whole-volume prediction."""
    from melecole.inference.options import build_predict_options
    from melecole.inference.sliding_window import predict_volume

    options = build_predict_options(cfg).plan_for(raw.shape)
    if backend:
        options = dataclasses.replace(options, backend=backend)
    options.configure_threads()
    start = time.perf_counter()
    affinities, foreground = predict_volume(model, raw, progress=False, **options.predict_kwargs())
    return affinities, foreground, time.perf_counter() - start, options


def score(cfg: Any, affinities: np.ndarray, foreground: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """VI split / merge / total (bits) and ARAND of infer.py's segmentation of these predictions."""
    from melecole.evaluation import evaluate_segmentation
    from melecole.inference.pipeline import segment_affinities
    from melecole.segmentation.options import build_segmentation_options

    stored = affinities.astype(np.float16), foreground.astype(np.float16)
    segmentation = segment_affinities(*stored, build_segmentation_options(cfg, "volume"))["segmentation"][0]
    result = evaluate_segmentation(segmentation, labels, top_k=0)
    return {"vi_split": result.vi_split, "vi_merge": result.vi_merge, "vi_total": result.vi_total,
            "arand": result.arand}  # fmt: skip


def largest_window(dataset: str) -> tuple[int, int, int]:
    """The window the planner picks for the synthetic 64x512x512 volume (the largest that fits)."""
    from melecole.inference.options import build_predict_options

    return build_predict_options(setting_cfg(dataset, SETTINGS["auto"])).plan_for(SYNTHETIC_SHAPE).window


def run_bare(model: torch.nn.Module, dataset: str, repeats: int) -> dict[str, float]:
    rows = {}
    for window in (*BARE_WINDOWS, largest_window(dataset)):
        rows["x".join(map(str, window))] = bare_forward(model, window, repeats)
        print(f"bare forward {'x'.join(map(str, window)):>12}: {rows['x'.join(map(str, window))]:.3f} Mvoxel/s",
              flush=True)  # fmt: skip
    return rows


def run_setting(model, raw, labels, dataset: str, name: str, backend: str | None, args, bare: float | None) -> dict:
    """One table row: plan, Mvoxel/s (best of repeats), ratio to the bare forward, scores."""
    cfg = setting_cfg(dataset, SETTINGS[name])
    seconds = []
    for _ in range(args.repeats if "speed" in args.sections else 1):
        affinities, foreground, elapsed, options = predict_once(model, raw, cfg, backend)
        seconds.append(elapsed)
    speed = raw.size / min(seconds) / 1e6
    row = {"dataset": dataset, "setting": name, "backend": backend or options.backend, "window": options.window,
           "stride": options.stride, "margin": options.margin, "tta": options.tta, "batch": options.batch_size,
           "windows": _window_count(raw.shape, options), "seconds": min(seconds), "mvoxel_s": speed,
           "ratio": speed / bare if bare else None}  # fmt: skip
    if labels is not None and "quality" in args.sections:
        row.update(score(cfg, affinities, foreground, labels))
    return row


def _window_count(shape: tuple[int, ...], options: Any) -> int:
    from melecole.inference.planner import window_count

    return int(np.prod([window_count(max(s, w), w, t) for s, w, t in zip(shape, options.window, options.stride)]))


def print_row(row: dict) -> None:
    ratio = f"{row['ratio']:.2f}" if row.get("ratio") else "-"
    scores = (f"{row['vi_split']:.3f} {row['vi_merge']:.3f} {row['vi_total']:.3f} {row['arand']:.3f}"
              if "vi_total" in row else "-")  # fmt: skip
    plan = f"{'x'.join(map(str, row['window']))}/{'x'.join(map(str, row['stride']))}"
    print(f"{row['dataset']:>9} {row['setting']:>11} {row['backend']:>11} {plan:>22} {row['tta']:>5} "
          f"{row['windows']:>4} {row['batch']:>2} {row['seconds']:>7.2f} {row['mvoxel_s']:>6.3f} {ratio:>5}  {scores}",
          flush=True)  # fmt: skip


HEADER = (f"{'dataset':>9} {'setting':>11} {'backend':>11} {'window/stride':>22} {'tta':>5} {'wins':>4} {'bs':>2} "
          f"{'pred s':>7} {'Mvox/s':>6} {'ratio':>5}  VI split / merge / total, ARAND")  # fmt: skip


def border_table(model: torch.nn.Module, cfg: Any, raw: np.ndarray, window: tuple[int, int, int]) -> dict:
    """Mean |affinity / foreground difference| between small windows and one whole-volume window,
    by distance to the small window's edge; small windows placed away from the volume border."""
    from melecole.inference.tta import IDENTITY, window_affinities

    offsets = [tuple(o) for o in cfg.INFERENCE.OFFSETS]
    big = [int(np.ceil(s / f) * f) for s, f in zip(raw.shape, (4, 4, 4))]
    padded = np.pad(raw, [(0, b - s) for b, s in zip(big, raw.shape)], mode="reflect")

    def run(crop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.ascontiguousarray(crop)).float().div_(255)[None, None]
        with torch.inference_mode():
            affinities, foreground = window_affinities(model, batch, [IDENTITY], offsets, float(cfg.LOSS.DELTA_D),
                                                       cfg.LOSS.NORM)  # fmt: skip
        return affinities[0].numpy(), foreground[0].numpy()

    reference = run(padded)
    valid = _valid_pairs(window, offsets)
    distance = [np.minimum(np.arange(w), np.arange(w)[::-1]) for w in window]
    dz = distance[0][:, None, None] + np.zeros(window, dtype=int)
    dyx = np.minimum(distance[1][None, :, None], distance[2][None, None, :]) + np.zeros(window, dtype=int)
    sums: dict[str, np.ndarray] = {k: np.zeros((2, 40)) for k in ("yx", "z")}
    counts = {k: np.zeros(40) for k in ("yx", "z")}
    gap = [max(0, (s - w) // 2) for s, w in zip(raw.shape, window)]
    for shift in itertools.product(*[sorted({g - 3, g, g + 3} & set(range(0, s - w + 1)))
                                     for g, s, w in zip(gap, raw.shape, window)]):  # fmt: skip
        box = tuple(slice(p, p + w) for p, w in zip(shift, window))
        affinities, foreground = run(raw[box])
        diff_aff = np.where(valid, np.abs(affinities - reference[0][(slice(None),) + box]), np.nan)
        diff_aff = np.nanmean(diff_aff, axis=0)
        diff_fg = np.abs(foreground - reference[1][box])
        for key, near, far, limit in (("yx", dyx, dz, 3), ("z", dz, dyx, 12)):
            mask = far >= min(limit, far.max())
            for d in range(min(40, int(near.max()) + 1)):
                chosen = mask & (near == d)
                if chosen.any():
                    sums[key][:, d] += (np.nanmean(diff_aff[chosen]) * chosen.sum(), diff_fg[chosen].sum())
                    counts[key][d] += chosen.sum()
    return {key: [(d, sums[key][0, d] / counts[key][d], sums[key][1, d] / counts[key][d])
                  for d in range(40) if counts[key][d]] for key in sums}  # fmt: skip


def _valid_pairs(window: tuple[int, int, int], offsets: list[tuple[int, ...]]) -> np.ndarray:
    """(C, z, y, x) bool: the pair (p, p + o) lies inside the window."""
    from melecole.utils.offsets import offset_slices

    valid = np.zeros((len(offsets), *window), dtype=bool)
    for channel, offset in enumerate(offsets):
        slices = offset_slices(window, offset)
        if slices is not None:
            valid[(channel,) + slices[0]] = True
    return valid


def print_border(dataset: str, window: tuple[int, int, int], table: dict) -> None:
    print(f"\nborder effect, {dataset}/val, small window {'x'.join(map(str, window))} vs one whole-volume window")
    for key, rows in table.items():
        print(f"  distance to the window edge in {key} (other axes far): d  mean|d aff|  mean|d fg|")
        for d, aff, fg in rows:
            print(f"    {d:>3} {aff:.4f} {fg:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-medulla", required=True)
    parser.add_argument("--checkpoint-fib-gala", help="default: the medulla checkpoint (same model shape)")
    parser.add_argument("--sections", nargs="+", default=["bare", "speed", "quality"],
                        choices=["bare", "speed", "quality", "border"])  # fmt: skip
    parser.add_argument("--datasets", nargs="+", default=["medulla", "fib-gala", "synthetic"],
                        choices=list(CONFIGS))  # fmt: skip
    parser.add_argument("--settings", nargs="+", default=["old", "24x128x128", "auto", "auto-x", "auto-yx"],
                        choices=list(SETTINGS))  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=[None], help="INFERENCE.BACKEND values (default: config's)")
    parser.add_argument("--border-window", nargs=3, type=int, default=[16, 64, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    parser.add_argument("--json", help="append the rows as JSON lines to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    THREADS["value"] = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = {"medulla": args.checkpoint_medulla, "fib-gala": args.checkpoint_fib_gala or args.checkpoint_medulla}
    checkpoints["synthetic"] = checkpoints["fib-gala"]
    print(f"torch threads {torch.get_num_threads()}; checkpoints {checkpoints}", flush=True)
    rows, bare = [], {}
    for dataset in args.datasets:
        cfg = setting_cfg(dataset, {})
        model = load_model(checkpoints[dataset], cfg)
        raw, labels = load_data(dataset)
        if "border" in args.sections and labels is not None:
            window = tuple(args.border_window)
            print_border(dataset, window, border_table(model, cfg, raw, window))
        if "bare" in args.sections:
            bare[dataset] = run_bare(model, dataset, args.repeats)
            rows.append({"dataset": dataset, "bare": bare[dataset]})
        largest = "x".join(map(str, largest_window(dataset)))
        if not {"speed", "quality"} & set(args.sections):
            continue
        print(HEADER)
        for name, backend in itertools.product(args.settings, args.backends):
            row = run_setting(model, raw, labels, dataset, name, backend, args, bare.get(dataset, {}).get(largest))
            print_row(row)
            rows.append(row)
    if args.json:
        with open(Path(args.json), "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=list) + "\n")


if __name__ == "__main__":
    main()
