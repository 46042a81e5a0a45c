"""Blockwise segmentation (python -m melecole.blockwise): quality, speed and scale tables.

Run: ``python bench/bench_blockwise.py [--quality] [--speed] [--scale] [--synthetic-root DIR]``
(no flag: all three). Affinities are stored first (HDF5 for quality and speed, uint8 zarr for
scale), then every method reads the same stored values.

Affinities: made from the ground truth, with realistic noise (no trained model is involved):
ideal affinities (1 = same label; pairs touching GT label 0 are 0; for GT without label 0 the
voxels on both sides of each contact count as 0, a 2-voxel membrane), blurred (sigma 0.5 in z, 1 in y
and x), plus spatially correlated Gaussian noise (std ``--noise`` after smoothing with sigma 1) and
white noise (std 0.05), clipped to [0, 1]. Quality therefore measures how faithfully the blockwise
algorithm reproduces the whole-volume MWS on the same affinities, not a model's accuracy.

Tables:

    spread    (--spread N) VI total of both block shapes per mode on N noise draws of the same volumes
              (in memory): how much of the block-shape spread is chance.
    quality   per volume (synthetic val, fib-gala val, medulla val): VI split / merge / total (bits)
              and ARAND of the whole-volume voxel MWS (+ INFERENCE.MIN_SEGMENT_SIZE and background
              fill, as infer.py) and of the blockwise run in both fragment modes with two block
              shapes (>= 8 blocks each), through the real dask runner (2 workers).
    speed     one synthetic volume (--speed-shape): seconds of all passes and Mvoxel/s, 1 vs 2
              workers, per fragment mode, and the whole-volume MWS time on one core.
    scale     --scale-shape (default 100 x 1024 x 1024, 12 channels, uint8 zarr) and a volume 8x
              smaller (--small-shape), each segmented by ``python -m melecole.blockwise`` in a
              subprocess; peak RSS of the whole process tree (driver + scheduler + workers) and the
              largest single-process peak (a worker), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFSETS = [
    [-1, 0, 0], [0, -1, 0], [0, 0, -1],
    [-2, 0, 0], [0, -5, 0], [0, 0, -5], [0, -5, -5], [0, -5, 5],
    [-1, -5, 0], [-1, 0, -5], [1, -5, 0], [1, 0, -5],
]  # fmt: skip
MIN_SEGMENT_SIZE = 20
CHUNKS = [8, 32, 32]  # quality: output chunks of which both block shapes below are multiples
SPEED_CHUNKS = [32, 64, 64]  # speed: production-sized output chunks (the default is 32 x 128 x 128)
BLOCKS = ([16, 64, 64], [32, 32, 64])
MIN_FRAGMENT_SIZE = [-1]  # BLOCKWISE.MIN_FRAGMENT_SIZE of every run (--min-fragment-size)


def noisy_affinities(labels: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """float32 (C, Z, Y, X): blurred ideal affinities + correlated and white noise, clipped."""
    from scipy import ndimage

    from melecole.inference.affinities import affinities_from_labels

    rng = np.random.default_rng(seed)
    if (labels == 0).mean() < 0.01:
        # Ground truth without a boundary class (medulla): the voxels on both sides of every contact
        # become boundary, as membranes look in EM (fib-gala's GT has such a class already).
        labels = labels.copy()
        contact = np.zeros(labels.shape, dtype=bool)
        for axis in range(3):
            change = np.diff(labels, axis=axis) != 0
            contact[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))] |= change
            contact[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] |= change
        labels[contact] = 0
    affinities = affinities_from_labels(labels, OFFSETS, ignore_background=True)
    for channel in range(len(OFFSETS)):
        blurred = ndimage.gaussian_filter(affinities[channel], (0.5, 1.0, 1.0))
        correlated = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape).astype(np.float32), 1.0)
        correlated *= noise / max(float(correlated.std()), 1e-6)
        white = rng.normal(0, 0.05, labels.shape).astype(np.float32)
        affinities[channel] = np.clip(blurred + correlated + white, 0, 1)
    return affinities


def config(block: list[int] | None = None, fragments: str = "mws", chunks: list[int] = CHUNKS):
    from melecole.blockwise.plan import build_options
    from melecole.config import get_default_cfg

    cfg = get_default_cfg()
    cfg.INFERENCE.OFFSETS = OFFSETS
    cfg.INFERENCE.MIN_SEGMENT_SIZE = MIN_SEGMENT_SIZE
    cfg.BLOCKWISE.OUTPUT_CHUNKS = chunks
    cfg.BLOCKWISE.MIN_FRAGMENT_SIZE = MIN_FRAGMENT_SIZE[0]
    return cfg, build_options(cfg, block_shape=block, fragments=fragments)


def scores(segmentation: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    from melecole.evaluation import evaluate_segmentation

    result = evaluate_segmentation(segmentation, labels, top_k=0)
    return result.vi_split, result.vi_merge, result.arand


def whole_volume_mws(affinities: np.ndarray) -> tuple[np.ndarray, float]:
    from melecole.segmentation.mws import mutex_watershed
    from melecole.segmentation.postprocess import postprocess_segmentation

    start = time.perf_counter()
    segmentation = mutex_watershed(affinities, OFFSETS)
    segmentation = postprocess_segmentation(segmentation, min_size=MIN_SEGMENT_SIZE, fill=True)
    return segmentation, time.perf_counter() - start


def run_blockwise(
    executor, affinities_url: str, output: Path, block, fragments: str, chunks: list[int] = CHUNKS
) -> tuple[np.ndarray, float]:
    from melecole.blockwise.runner import segment_blockwise
    from melecole.io.volumes import open_volume

    _, options = config(block, fragments, chunks)
    summaries = segment_blockwise(
        affinities_url, str(output), options, executor=executor, progress=False, overwrite=True,
        report=lambda line: None,
    )
    return open_volume(str(output)).read(), sum(s.seconds for s in summaries)


def quality_volumes(synthetic_root: Path) -> list[tuple[str, Path]]:
    shared = REPO_ROOT.parent / "shared" / "data"
    candidates = [
        ("synthetic val", next(iter(sorted((synthetic_root / "val").glob("*.hdf"))), None)),
        ("fib-gala val", shared / "fib-gala" / "val" / "gala_test.hdf"),
        ("medulla val", shared / "medulla" / "val" / "medulla_val.hdf"),
    ]
    return [(name, path) for name, path in candidates if path is not None and path.is_file()]


def quality(workdir: Path, synthetic_root: Path, noise: float) -> None:
    import h5py

    from melecole.blockwise.runner import dask_executor

    print(f"\n## Same quality (noisy GT affinities, noise {noise}; VI in bits; 2 dask workers; "
          f"BLOCKWISE.MIN_FRAGMENT_SIZE {MIN_FRAGMENT_SIZE[0]})\n")
    print("| volume | shape | method | blocks | VI split | VI merge | VI total | dVI vs whole | ARAND | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with dask_executor(2) as executor:
        for name, path in quality_volumes(synthetic_root):
            with h5py.File(path, "r") as handle:
                labels = handle["labels"][()]
            affinities = noisy_affinities(labels, noise)
            stored = workdir / f"{path.stem}_affinities.hdf"
            with h5py.File(stored, "w") as handle:
                handle["affinities"] = affinities
            whole, seconds = whole_volume_mws(affinities)
            split, merge, arand = scores(whole, labels)
            reference = split + merge
            shape = "x".join(map(str, labels.shape))
            row = f"| {name} | {shape} | whole-volume MWS | 1 | {split:.3f} | {merge:.3f} | {reference:.3f} | 0 | "
            print(row + f"{arand:.3f} | {seconds:.1f} |", flush=True)
            for fragments in ("mws", "watershed"):
                for block in BLOCKS:
                    _, options = config(block, fragments)
                    blocks = np.prod([-(-s // b) for s, b in zip(labels.shape, block)])
                    segmentation, seconds = run_blockwise(
                        executor, f"{stored}:affinities", workdir / "seg.zarr", block, fragments
                    )
                    split, merge, arand = scores(segmentation, labels)
                    total = split + merge
                    print(
                        f"| {name} | {shape} | blockwise {fragments} {'x'.join(map(str, block))} | {blocks} | "
                        f"{split:.3f} | {merge:.3f} | {total:.3f} | {total - reference:+.3f} | {arand:.3f} | "
                        f"{seconds:.1f} |",
                        flush=True,
                    )


def block_shape_spread(synthetic_root: Path, noise: float, draws: int) -> None:
    """VI total of the two block shapes per fragment mode and noise draw (the in-memory algorithm, which
    the dask runs equal exactly): how much of the block-shape spread is chance."""
    import h5py

    from melecole.blockwise.segment import segment_blockwise_in_memory

    print(f"\n## Block-shape spread over noise draws (VI total {' / '.join('x'.join(map(str, b)) for b in BLOCKS)})\n")
    print("| volume | mode | " + " | ".join(f"draw {d}" for d in range(draws)) + " |")
    print("|---|---|" + "---|" * draws)
    for name, path in quality_volumes(synthetic_root):
        with h5py.File(path, "r") as handle:
            labels = handle["labels"][()]
        affinities = [noisy_affinities(labels, noise, seed=draw) for draw in range(draws)]
        for fragments in ("mws", "watershed"):
            cells = []
            for values in affinities:
                segmentations = [segment_blockwise_in_memory(values, config(b, fragments)[1])[0] for b in BLOCKS]
                totals = [sum(scores(segmentation, labels)[:2]) for segmentation in segmentations]
                cells.append(f"{totals[0]:.3f} / {totals[1]:.3f} ({abs(totals[0] - totals[1]):.3f})")
            print(f"| {name} | {fragments} | " + " | ".join(cells) + " |", flush=True)


def voronoi_labels(shape, objects: int, seed: int = 0) -> np.ndarray:
    """uint32 Voronoi cells (z anisotropy 4), with 1-voxel membranes (label 0) between cells."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    markers = np.zeros(shape, dtype=np.int32)
    markers[tuple(rng.integers(0, shape, size=(objects, 3)).T)] = np.arange(1, objects + 1)
    _, index = ndimage.distance_transform_edt(markers == 0, sampling=(4, 1, 1), return_indices=True)
    labels = markers[tuple(index)].astype(np.uint32)
    del index
    boundary = np.zeros(shape, dtype=bool)
    for axis in (1, 2):
        boundary |= np.diff(labels, axis=axis, append=np.take(labels, [-1], axis=axis)) != 0
    labels[boundary] = 0
    return labels


def speed(
    workdir: Path, shape: tuple[int, int, int], block: list[int], noise: float, modes: list[str], repeat: int
) -> None:
    from melecole.blockwise.runner import dask_executor
    from melecole.io.volumes import write_volume

    labels = voronoi_labels(shape, objects=max(50, int(np.prod(shape) // 40000)))
    # Stored as infer.py --affinities-only writes them: uint8 round(255 a), small storage chunks.
    affinities = np.rint(noisy_affinities(labels, noise) * 255).astype(np.uint8)
    stored = workdir / "speed_affinities.zarr"
    write_volume(str(stored), affinities, chunks=(len(OFFSETS), 16, 64, 64), overwrite=True)
    voxels = int(np.prod(shape))
    whole, whole_seconds = whole_volume_mws(affinities.astype(np.float32) / 255.0)
    reference = sum(scores(whole, labels)[:2])
    del affinities, whole
    size, load = "x".join(map(str, shape)), os.getloadavg()[0]
    print(f"\n## Speed ({size}, block {'x'.join(map(str, block))}, load average {load:.1f}, "
          f"BLOCKWISE.MIN_FRAGMENT_SIZE {MIN_FRAGMENT_SIZE[0]})\n")
    print(f"median of {repeat} runs per row, 1- and 2-worker runs alternating (each on a new LocalCluster)\n")
    print("| method | workers | s (all passes) | min-max s | Mvoxel/s | speed-up vs 1 worker | VI total "
          "| dVI vs whole |")
    print("|---|---|---|---|---|---|---|---|")
    rate = voxels / whole_seconds / 1e6
    print(f"| whole-volume MWS | 1 | {whole_seconds:.1f} | | {rate:.2f} | | {reference:.3f} | 0 |")
    for fragments in modes:
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeat):  # alternate, so a passing load spike hits both worker counts alike
            for workers in (1, 2):
                with dask_executor(workers) as executor:
                    segmentation, seconds = run_blockwise(
                        executor, str(stored), workdir / "seg.zarr", block, fragments, SPEED_CHUNKS
                    )
                times[workers].append(seconds)
        total = sum(scores(segmentation, labels)[:2])  # identical labels in every run (tested)
        single = float(np.median(times[1]))
        for workers in (1, 2):
            seconds = float(np.median(times[workers]))
            print(
                f"| blockwise {fragments} | {workers} | {seconds:.1f} | {min(times[workers]):.1f}-"
                f"{max(times[workers]):.1f} | {voxels / seconds / 1e6:.2f} | {single / seconds:.2f}x | "
                f"{total:.3f} | {total - reference:+.3f} |",
                flush=True,
            )


def write_scale_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """uint8 affinities (12, Z, Y, X) of tiled Voronoi labels, written slab by slab (bounded memory)."""
    from melecole.inference.affinities import affinities_from_labels
    from melecole.io.volumes import create_volume

    tile = voronoi_labels((shape[0], 256, 256), objects=300, seed=seed)
    rng = np.random.default_rng(seed)
    with create_volume(
        str(path), (len(OFFSETS),) + tuple(shape), np.uint8, chunks=(len(OFFSETS), 16, 64, 64), overwrite=True
    ) as writer:
        for y in range(0, shape[1], 256):
            for x in range(0, shape[2], 256):
                labels = np.where(tile > 0, tile + np.uint32(1000 * (y // 256 * 64 + x // 256 + 1)), 0)
                # Neighbour tiles hold other ids, so pairs leaving a tile (invalid here: 0) are cuts anyway.
                ideal = affinities_from_labels(labels, OFFSETS, ignore_background=True)
                noisy = np.clip(0.1 + 0.8 * ideal + rng.normal(0, 0.1, ideal.shape), 0, 1)
                writer.write((slice(None), slice(0, shape[0]), slice(y, y + 256), slice(x, x + 256)),
                             np.rint(noisy * 255).astype(np.uint8))


def high_water_mark(pid: int) -> int:
    """Peak RSS of a live process in bytes, as the kernel counts it (Linux VmHWM), or 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Samples the RSS of a process and all its descendants every ``interval`` seconds. The single-process
    peak is the kernel's high-water mark of each child (Linux), so a short spike between two samples
    counts too; elsewhere it falls back to the sampled RSS."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self.process] + self.process.children(recursive=True)
                sizes, peaks = [], []
                for process in processes:
                    try:
                        sizes.append(process.memory_info().rss)
                        peaks.append(max(sizes[-1], high_water_mark(process.pid)))
                    except psutil.Error:
                        pass
                self.peak_total = max(self.peak_total, sum(sizes))
                self.peak_single = max(self.peak_single, max(peaks[1:], default=0))
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def scale(workdir: Path, shapes: list[tuple[int, int, int]], modes: list[str], workers: int, block) -> None:
    print(f"\n## Scale (12 channels, uint8 zarr, {workers} workers, block {'x'.join(map(str, block))}, "
          f"BLOCKWISE.MIN_FRAGMENT_SIZE {MIN_FRAGMENT_SIZE[0]})\n")
    print("| shape | Mvoxel | mode | s | Mvoxel/s | peak RSS tree (GB) | peak single process, VmHWM (GB) |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        stored = workdir / f"scale_{'x'.join(map(str, shape))}.zarr"
        if not stored.exists():
            write_scale_volume(stored, shape)
        voxels = int(np.prod(shape))
        for mode in modes:
            output = workdir / "scale_seg.zarr"
            command = [
                sys.executable, "-m", "melecole.blockwise", "--affinities", str(stored), "--output", str(output),
                "--overwrite", "--workers", str(workers), "--fragments", mode, "--block", *map(str, block),
                "--config", str(REPO_ROOT / "configs" / "synthetic-UNet3D.yaml"), "LOG.PROGRESS_BAR", "False",
                "BLOCKWISE.OUTPUT_CHUNKS", "[32, 128, 128]", "BLOCKWISE.MIN_FRAGMENT_SIZE", str(MIN_FRAGMENT_SIZE[0]),
            ]
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            memory = TreeMemory(process.pid)
            out, _ = process.communicate()
            memory.stop()
            seconds = time.perf_counter() - start
            if process.returncode != 0:
                print(out)
                raise SystemExit(f"scale run failed ({process.returncode})")
            passes = "; ".join(line for line in out.splitlines() if " blocks in " in line)
            print(
                f"| {'x'.join(map(str, shape))} | {voxels / 1e6:.0f} | {mode} | {seconds:.0f} | "
                f"{voxels / seconds / 1e6:.2f} | {memory.peak_total / 1e9:.2f} | {memory.peak_single / 1e9:.2f} |",
                flush=True,
            )
            print(f"<!-- {passes} -->", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--spread", type=int, default=0, metavar="DRAWS", help="block-shape spread over noise draws")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--noise", type=float, default=0.15, help="std of the correlated affinity noise")
    parser.add_argument("--synthetic-root", type=Path, default=REPO_ROOT / "dataset" / "synthetic")
    parser.add_argument("--speed-shape", type=int, nargs=3, default=[64, 384, 384])
    parser.add_argument("--speed-block", type=int, nargs=3, default=[32, 192, 192])
    parser.add_argument("--scale-shape", type=int, nargs=3, default=[100, 1024, 1024])
    parser.add_argument("--small-shape", type=int, nargs=3, default=[50, 512, 512])
    parser.add_argument("--scale-modes", nargs="+", default=["watershed", "mws"])
    parser.add_argument("--scale-block", type=int, nargs=3, default=[32, 256, 256])
    parser.add_argument("--workdir", type=Path, help="keep stored affinities here (default: a temporary folder)")
    parser.add_argument("--min-fragment-size", type=int, default=-1, help="BLOCKWISE.MIN_FRAGMENT_SIZE (-1: auto)")
    parser.add_argument("--repeat", type=int, default=3, help="speed: runs per worker count (median)")
    parser.add_argument("--speed-modes", nargs="+", default=["watershed", "mws"], choices=["watershed", "mws"])
    args = parser.parse_args()
    MIN_FRAGMENT_SIZE[0] = args.min_fragment_size
    everything = not (args.quality or args.speed or args.scale or args.spread)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.quality or everything:
            quality(workdir, args.synthetic_root, args.noise)
        if args.spread:
            block_shape_spread(args.synthetic_root, args.noise, args.spread)
        if args.speed or everything:
            speed(workdir, tuple(args.speed_shape), args.speed_block, args.noise, args.speed_modes, args.repeat)
        if args.scale or everything:
            shapes = [tuple(args.small_shape), tuple(args.scale_shape)]
            scale(workdir, shapes, args.scale_modes, 2, args.scale_block)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
