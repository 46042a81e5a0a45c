"""Peak memory of chunk-by-chunk affinity prediction for a volume and one 8x larger.

Run: ``python bench/bench_chunked_io.py [--base 32 128 128] [--chunk 16 64 64] [--whole]``.
Every measurement runs in a fresh child process: one writes the synthetic uint8 input block by
block (never the whole volume in memory), one predicts from it with a tiny UNet3D on one CPU
thread and reports its RSS before predicting (imports, model, opened volumes) and its peak RSS
(``ru_maxrss``). Pairs: precomputed -> zarr and zarr -> precomputed. ``--whole`` adds the
whole-volume ``predict_volume`` on the same inputs for comparison. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from melecole.config import get_default_cfg

OFFSETS = [list(offset) for offset in get_default_cfg().INFERENCE.OFFSETS]  # the 12 default offsets
WINDOW = (8, 32, 32)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic_block(box: tuple[slice, ...]) -> np.ndarray:
    """uint8 raw of one block from global coordinates: bright cells, dark curved membranes, noise."""
    z, y, x = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij")
    membrane = (
        np.abs(np.sin(x / 9.0 + np.sin(y / 13.0) + z / 7.0) * np.sin(y / 11.0 + np.cos(x / 17.0))) < 0.12
    )
    noise = np.random.default_rng(abs(hash((box[0].start, box[1].start, box[2].start))) % 2**32).normal(
        0, 12, z.shape
    )
    return np.clip(np.where(membrane, 60, 190) + noise, 0, 255).astype(np.uint8)


def make_input(url: str, shape: list[int], chunk: list[int]) -> None:
    from melecole.io import create_volume, iter_blocks

    with create_volume(url, shape, np.uint8, chunks=chunk, resolution=(30, 6, 6)) as writer:
        for box in iter_blocks(shape, chunk):
            writer.write(box, synthetic_block(box))


def build_model():
    import torch

    from melecole.models import UNet3D

    torch.manual_seed(0)
    return UNet3D(filters=(4, 8), pool_z=(False,), embedding_dim=8, norm="none").eval()


def predict(source: str, sink: str, chunk: list[int], whole: bool) -> dict:
    import torch

    from melecole.inference import predict_volume
    from melecole.inference.chunked import predict_affinities_chunked
    from melecole.io import open_volume

    torch.set_num_threads(1)
    import cloudvolume  # noqa: F401  both formats' libraries count in the baseline, whichever is used
    import zarr  # noqa: F401

    model = build_model()
    volume = open_volume(source)
    options = dict(window=WINDOW, offsets=OFFSETS, delta_d=1.5, batch_size=4, progress=False)
    baseline = current_rss_mb()
    start = time.perf_counter()
    if whole:
        affinities, foreground = predict_volume(model, volume[:], **options)
        del affinities, foreground
        chunks = 1
    else:
        chunks = predict_affinities_chunked(model, volume, sink, chunk_shape=chunk, **options).chunks
    return {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - start,
        "chunks": chunks,
        "voxels": volume.size,
    }


def child(arguments: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *arguments], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, nargs=3, default=[32, 128, 128], help="smaller volume (z, y, x)")
    parser.add_argument("--chunk", type=int, nargs=3, default=[16, 64, 64], help="output block (z, y, x)")
    parser.add_argument("--whole", action="store_true", help="also run whole-volume predict_volume")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, *rest = args.child
        if task == "make":
            make_input(rest[0], json.loads(rest[1]), json.loads(rest[2]))
            print(json.dumps({}))
        else:
            print(json.dumps(predict(rest[0], rest[1], json.loads(rest[2]), task == "whole")))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_chunked_io_") as folder:
        for factor in (1, 2):
            shape = [s * factor for s in args.base]
            inputs = {
                "precomputed": f"precomputed://file://{folder}/raw{factor}",
                "zarr": f"{folder}/raw{factor}.zarr",
            }
            for url in inputs.values():
                child(["make", url, json.dumps(shape), json.dumps(args.chunk)])
            runs = [
                ("precomputed", "zarr", f"{folder}/aff{factor}.zarr"),
                ("zarr", "precomputed", f"precomputed://file://{folder}/aff{factor}"),
            ]
            for source_format, sink_format, sink in runs:
                result = child(["chunked", inputs[source_format], sink, json.dumps(args.chunk)])
                rows.append((f"chunked {source_format} -> {sink_format}", shape, result))
            if args.whole:
                result = child(["whole", inputs["zarr"], "", json.dumps(args.chunk)])
                rows.append(("whole volume (predict_volume)", shape, result))
    print(f"window {list(WINDOW)}, chunk {args.chunk}, 12 offsets, UNet3D filters (4, 8), 1 CPU thread\n")
    print(
        "| run | shape (z, y, x) | voxels | blocks | RSS before (MiB) | peak RSS (MiB) | peak - before | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, r in rows:
        print(
            f"| {name} | {tuple(shape)} | {r['voxels'] / 1e6:.2f} M | {r['chunks']} | "
            f"{r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    for name in sorted({row[0] for row in rows}):
        small, large = [r for n, _, r in rows if n == name]
        growth = [max(r["peak_mb"] - r["baseline_mb"], 1.0) for r in (small, large)]
        print(
            f"\n{name}: peak 8x / 1x = {large['peak_mb'] / small['peak_mb']:.2f}, "
            f"(peak - before) 8x / 1x = {growth[1] / growth[0]:.2f}",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
