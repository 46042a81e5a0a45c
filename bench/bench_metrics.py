"""VI split/merge + adapted Rand error: melecole.evaluation vs skimage.metrics on one SNEMI3D-sized pair.

Run: ``python bench/bench_metrics.py [--shape 100 1024 1024] [--objects 3000] [--timeout 240]``.
Generates a uint64 GT (drifting 2D Voronoi cells with 1-voxel boundaries labelled 0, a few thousand
objects) and a prediction with merges, splits and background voxels, saves both to a temporary
folder, then runs each method in its own subprocess: the values (which must agree), the time, and
the peak RSS above the loaded inputs (VmHWM after resetting it through /proc/self/clear_refs,
ru_maxrss where that is unavailable). skimage builds its contingency table once per call, as it is
normally used: variation_of_information(gt, seg, ignore_labels=[0]) + adapted_rand_error(gt, seg).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

UPSAMPLE = 4  # in-plane: Voronoi cells are computed on a 4x coarser grid, then repeated


def make_gt_cells(shape: tuple[int, int, int], objects: int, rng: np.random.Generator) -> np.ndarray:
    """(Z, Y, X) uint64 cell ids 1..objects without boundary: 2D Voronoi cells per section whose
    seeds drift with z and live for a random z-range, so cells wander, appear and end like neurites."""
    depth, height, width = shape
    coarse = (-(-height // UPSAMPLE), -(-width // UPSAMPLE))
    start = rng.uniform(0, coarse, size=(objects, 2))
    velocity = rng.normal(0, 0.6, size=(objects, 2))  # coarse pixels per section
    first = rng.integers(-depth // 2, depth, objects)
    last = first + rng.integers(depth // 4, 2 * depth, objects)
    grid = np.stack(np.meshgrid(np.arange(coarse[0]), np.arange(coarse[1]), indexing="ij"), -1).reshape(-1, 2)
    cells = np.empty(shape, dtype=np.uint64)
    for z in range(depth):
        alive = np.flatnonzero((first <= z) & (last > z))
        if alive.size == 0:
            alive = np.arange(objects)
        seeds = np.mod(start[alive] + velocity[alive] * z, coarse)
        _, nearest = cKDTree(seeds).query(grid, workers=-1)
        section = (alive[nearest] + 1).astype(np.uint64).reshape(coarse)
        section = np.repeat(np.repeat(section, UPSAMPLE, 0), UPSAMPLE, 1)
        cells[z] = section[:height, :width]
    return cells


def make_pair(shape: tuple[int, int, int], objects: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(segmentation, gt), both (Z, Y, X) uint64; GT 0 on cell boundaries; the prediction merges 3% of
    the cells into another, splits 5% at a random section and has background (0) on the boundaries."""
    rng = np.random.default_rng(seed)
    cells = make_gt_cells(shape, objects, rng)
    # Prediction: 3% of the cells merged into another cell, 5% split at a random section, ids scattered.
    lookup = np.arange(objects + 1, dtype=np.uint64)
    merged = rng.choice(np.arange(1, objects + 1), objects * 3 // 100, replace=False)
    lookup[merged] = rng.integers(1, objects + 1, merged.size)
    split_section = np.full(objects + 1, shape[0] + 1)
    split = rng.choice(np.arange(1, objects + 1), objects * 5 // 100, replace=False)
    split_section[split] = rng.integers(1, shape[0], split.size)
    scatter = rng.choice(20 * objects, 2 * objects + 1, replace=False).astype(np.uint64) + 1
    gt = np.empty_like(cells)
    segmentation = np.empty_like(cells)
    for z in range(shape[0]):
        section = cells[z]
        boundary = np.zeros(section.shape, dtype=bool)
        boundary[:-1] |= section[:-1] != section[1:]
        boundary[:, :-1] |= section[:, :-1] != section[:, 1:]
        gt[z] = np.where(boundary, 0, section)
        predicted = lookup[section] + np.where(split_section[section] <= z, objects, 0).astype(np.uint64)
        predicted = scatter[predicted]
        # Background (0) on the GT boundary and, for 5% of the voxels across a vertical boundary, on
        # the labelled side: predicted 0 is an ordinary segment, so those voxels count as a merge.
        background = boundary.copy()
        background[:, 1:] |= (section[:, 1:] != section[:, :-1]) & (
            rng.random((shape[1], shape[2] - 1)) < 0.05
        )
        predicted[background] = 0
        segmentation[z] = predicted
    return segmentation, gt


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def worker(method: str, folder: Path) -> dict:
    """Runs one method on the saved pair; returns values, seconds and peak RSS above the inputs."""
    segmentation = np.load(folder / "segmentation.npy")
    gt = np.load(folder / "gt.npy")
    if method == "melecole":
        from melecole.evaluation import evaluate_segmentation
    else:
        import skimage.metrics
    baseline = _status_kib("VmRSS") or 0
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        peak_source = "VmHWM"
    except OSError:
        peak_source = "ru_maxrss"
    start = time.perf_counter()
    if method == "melecole":
        scores = evaluate_segmentation(segmentation, gt)
        values = [scores.vi_split, scores.vi_merge, scores.arand]
    else:
        split, merge = skimage.metrics.variation_of_information(gt, segmentation, ignore_labels=[0])
        arand = skimage.metrics.adapted_rand_error(gt, segmentation)[0]
        values = [float(split), float(merge), float(arand)]
    seconds = time.perf_counter() - start
    if peak_source == "VmHWM":
        peak = _status_kib("VmHWM") or 0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "values": values,
        "seconds": seconds,
        "peak_delta_mib": (peak - baseline) / 1024,
        "peak": peak_source,
    }


def run_method(method: str, folder: Path, timeout: float) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--data", str(folder)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:g} s"}
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit code {completed.returncode} ({tail})"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 1024, 1024], metavar=("Z", "Y", "X"))
    parser.add_argument("--objects", type=int, default=3000, help="GT cells in the whole volume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed per method")
    parser.add_argument("--worker", choices=["melecole", "skimage"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return

    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="bench_metrics_") as directory:
        folder = Path(directory)
        start = time.perf_counter()
        segmentation, gt = make_pair(shape, args.objects, args.seed)
        generated = time.perf_counter() - start
        labelled = float((gt != 0).mean())
        n_gt, n_seg = len(np.unique(gt[gt != 0])), len(np.unique(segmentation))
        np.save(folder / "segmentation.npy", segmentation)
        np.save(folder / "gt.npy", gt)
        del segmentation, gt
        print(
            f"pair {shape} uint64 ({np.prod(shape) * 8 / 2**20:.0f} MiB each), "
            f"generated in {generated:.1f} s: "
            f"{n_gt} GT objects, {n_seg} predicted segments, {labelled:.1%} labelled GT voxels"
        )
        results = {method: run_method(method, folder, args.timeout) for method in ("melecole", "skimage")}

    header = (
        f"{'method':<10}{'VI split':>12}{'VI merge':>12}{'ARAND':>12}{'time [s]':>11}{'peak RSS +[MiB]':>17}"
    )
    print("\n" + header)
    for method, result in results.items():
        if "error" in result:
            print(f"{method:<10}  {result['error']}")
            continue
        split, merge, arand = result["values"]
        print(
            f"{method:<10}{split:>12.6f}{merge:>12.6f}{arand:>12.6f}"
            f"{result['seconds']:>11.2f}{result['peak_delta_mib']:>17.0f}"
        )
    ours, theirs = results["melecole"], results["skimage"]
    if "error" not in ours and "error" not in theirs:
        difference = max(abs(a - b) for a, b in zip(ours["values"], theirs["values"]))
        verdict = "agree" if difference < 1e-9 else "DISAGREE"
        print(f"\nmax |difference| of the values: {difference:.2e} ({verdict})")
        print(f"speed ratio skimage / melecole: {theirs['seconds'] / ours['seconds']:.1f}x")
        memory_ratio = theirs["peak_delta_mib"] / max(ours["peak_delta_mib"], 1)
        print(f"peak memory ratio skimage / melecole: {memory_ratio:.1f}x")
        print(f"peak RSS measured as {ours['peak']} above the loaded inputs, each method in its own process")


if __name__ == "__main__":
    main()
