"""Post-processing cost: embeddings -> affinities -> mutex watershed on a synthetic volume.

Run: ``python bench/bench_postprocess.py [--shape 64 512 512] [--embedding-dim 16] [--threads 1]``.

Embeddings are per-object random vectors (a Voronoi label volume) plus per-voxel noise, so that
the affinities are neither trivial nor random and the mutex watershed has real work. Each stage
runs in its own process: it loads its inputs, resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and reports its wall time and its peak memory above the loaded inputs,
relative to the size of the float32 affinity array (C, Z, Y, X). Rows:

    affinities     embeddings_to_affinities (torch CPU)
    mws wrapper    melecole.inference.mutex_watershed (weights a / 1 - a computed in a new array)
    mws in_place   the same with in_place=True (weights overwrite the affinities; --in-place)
    mws bare       bioimage_cpp.segmentation.mutex_watershed on precomputed weights

The wrapper's overhead is (wrapper - bare) / bare; its labels must equal the bare call's. On a
shared machine that difference is noisy, so the time of the wrapper's own extra work (the weight
conversion) is reported as well. The full 64 x 512 x 512 volume takes several minutes per MWS run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OFFSETS = [
    [-1, 0, 0], [0, -1, 0], [0, 0, -1],
    [-2, 0, 0], [0, -5, 0], [0, 0, -5], [0, -5, -5], [0, -5, 5],
    [-1, -5, 0], [-1, 0, -5], [1, -5, 0], [1, 0, -5],
]  # fmt: skip
DELTA_D = 1.5


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(shape: tuple[int, int, int], embedding_dim: int, objects: int, noise: float, workdir: Path) -> None:
    """Voronoi labels (z anisotropy 5) -> embeddings = object vector + noise, saved as .npy."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    seeds = np.zeros(shape, dtype=bool)
    coordinates = [rng.integers(0, size, objects) for size in shape]
    seeds[tuple(coordinates)] = True
    _, indices = ndimage.distance_transform_edt(~seeds, sampling=(5, 1, 1), return_indices=True)
    seed_ids = np.zeros(shape, dtype=np.int32)
    seed_ids[seeds] = np.arange(1, int(seeds.sum()) + 1)
    labels = seed_ids[tuple(indices)]
    del indices
    means = rng.normal(0.0, 1.0, (labels.max() + 1, embedding_dim)).astype(np.float32)
    embedding = np.empty((embedding_dim,) + shape, dtype=np.float32)
    for channel in range(embedding_dim):
        embedding[channel] = means[labels, channel] + rng.normal(0.0, noise, shape).astype(np.float32)
    np.save(workdir / "embedding.npy", embedding)


def run_stage(stage: str, workdir: Path, threads: int) -> dict:
    """One stage in this process; returns seconds, peak bytes above the inputs, a labels digest."""
    import torch

    torch.set_num_threads(threads)
    from melecole.inference import embeddings_to_affinities, mutex_watershed, mws_weights

    if stage == "affinities":
        inputs = np.load(workdir / "embedding.npy")
    else:
        inputs = np.load(workdir / "affinities.npy")
        if stage == "mws bare":
            inputs = mws_weights(inputs, 3, in_place=True)
    conversion = 0.0
    if stage == "mws wrapper":  # the wrapper's own work, timed on a copy (outside the peak)
        copy = inputs.copy()
        start = time.perf_counter()
        mws_weights(copy, 3, in_place=True)
        conversion = time.perf_counter() - start
        del copy
    baseline = _status_kib("VmRSS")
    exact = _reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    if stage == "affinities":
        output = embeddings_to_affinities(inputs, OFFSETS, DELTA_D, "l2")
    elif stage == "mws wrapper":
        output = mutex_watershed(inputs, OFFSETS)
    elif stage == "mws in_place":
        output = mutex_watershed(inputs, OFFSETS, in_place=True)
    else:
        from bioimage_cpp.segmentation import mutex_watershed as engine

        output = engine(inputs, OFFSETS, 3)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (_status_kib("VmHWM") - baseline) * 1024
    digest = hashlib.sha256(output.astype(np.uint64).tobytes()).hexdigest()[:12]
    if stage == "affinities":
        np.save(workdir / "affinities.npy", output)
    segments = int(output.max()) if stage != "affinities" else 0
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak": peak,
        "exact": exact,
        "digest": digest,
        "segments": segments,
        "conversion": conversion,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--noise", type=float, default=0.1, help="per-voxel embedding noise (std)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--in-place", action="store_true", help="also time mutex_watershed(in_place=True)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, Path(args.workdir), args.threads)))
        return

    shape = tuple(args.shape)
    affinity_bytes = len(OFFSETS) * int(np.prod(shape)) * 4
    print(
        f"volume {shape}, E={args.embedding_dim}, {len(OFFSETS)} offsets, ~{args.objects} objects, "
        f"noise {args.noise}; "
        f"affinities {affinity_bytes / 2**20:.0f} MiB"
    )
    with tempfile.TemporaryDirectory(prefix="bench_postprocess_") as workdir:
        start = time.perf_counter()
        make_inputs(shape, args.embedding_dim, args.objects, args.noise, Path(workdir))
        print(f"synthetic embeddings: {time.perf_counter() - start:.1f} s")
        rows = {}
        stages = ["affinities", "mws wrapper"] + (["mws in_place"] if args.in_place else []) + ["mws bare"]
        for stage in stages:
            command = [
                sys.executable,
                __file__,
                "--stage",
                stage,
                "--workdir",
                workdir,
                "--threads",
                str(args.threads),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[stage] = json.loads(result.stdout.strip().splitlines()[-1])

    print(f"\n{'stage':<14} {'wall s':>8} {'CPU s':>8} {'peak extra MiB':>15} {'x affinities':>13}  segments")
    for stage, row in rows.items():
        print(
            f"{stage:<14} {row['seconds']:>8.2f} {row['cpu']:>8.2f} {row['peak'] / 2**20:>15.0f} "
            f"{row['peak'] / affinity_bytes:>13.2f}  {row['segments'] or ''}"
        )
    # CPU time: wall time on a shared machine mostly measures the other processes.
    bare = rows["mws bare"]["cpu"]
    overhead = (rows["mws wrapper"]["cpu"] - bare) / bare
    conversion = rows["mws wrapper"]["conversion"]
    print(f"\nwrapper overhead over the bare call: {overhead:+.1%} CPU time (target < 15%); its own extra")
    print(f"  work, the weight conversion, takes {conversion:.2f} s = {conversion / bare:.1%} of the bare call")
    if "mws in_place" in rows:
        print(f"  in_place: {(rows['mws in_place']['cpu'] - bare) / bare:+.1%} measured")
    same = len({row["digest"] for stage, row in rows.items() if stage != "affinities"}) == 1
    print(f"wrapper labels identical to the bare call: {same}")
    if not all(row["exact"] for row in rows.values()):
        print("note: /proc/self/clear_refs not writable; peaks include the loaded inputs")


if __name__ == "__main__":
    main()
