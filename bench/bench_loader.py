"""Training-loader throughput (all augmentations on) versus one model training step.

Run: ``python bench/bench_loader.py [--config configs/synthetic-UNet3D.yaml] [--batches 6] [KEY VALUE ...]``.
Prints one table: milliseconds per patch of each augmentation (P = 1), loader samples/s with
HARDWARE.NUM_WORKERS 0 and 2, and the time of one forward + backward + optimizer step on a batch
of OPTIM.BATCH_SIZE. The loader keeps up when its samples/s exceed the step's samples/s. When
DATASET.DATA_ROOT/train holds no volumes (the synthetic set is not generated), random volumes of
``--volume-shape`` are written to a temporary folder instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from yacs.config import CfgNode

from melecole.config import load_cfg
from melecole.data.augment import build_augmentor
from melecole.data.dataset import build_train_loader
from melecole.errors import DataError
from melecole.utils.device import resolve_device

GROUPS = (
    "FLIP", "ROTATE", "ELASTIC", "GRAYSCALE", "MISSING_SECTION", "MISSING_PARTS",
    "MISALIGNMENT", "MOTION_BLUR", "CUT_BLUR", "NOISE",
)  # fmt: skip


def random_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8, labels uint32): random box-shaped objects with 1-voxel boundaries (label 0)."""
    coarse_shape = tuple(-(-s // b) for s, b in zip(shape, (4, 12, 12)))
    coarse = rng.integers(1, 2**31, size=coarse_shape, dtype=np.uint32)
    labels = coarse.repeat(4, 0).repeat(12, 1).repeat(12, 2)[: shape[0], : shape[1], : shape[2]].copy()
    labels[:, 1:][labels[:, 1:] != labels[:, :-1]] = 0
    labels[:, :, 1:][labels[:, :, 1:] != labels[:, :, :-1]] = 0
    raw = np.where(labels == 0, 40, 170).astype(np.uint8) + rng.integers(0, 60, shape, dtype=np.uint8)
    return raw, labels


def ensure_data(cfg: CfgNode, shape: tuple[int, int, int], scratch: Path) -> list[str]:
    """Config overrides pointing to temporary random volumes when DATA_ROOT/train is empty."""
    train = Path(cfg.DATASET.DATA_ROOT) / cfg.DATASET.TRAIN_SPLIT
    if train.is_dir() and any(p.suffix.lower() in (".hdf", ".h5", ".hdf5") for p in train.iterdir()):
        return []
    print(f"# {train} has no volumes: using 2 random volumes of shape {shape} (uint32 labels)")
    rng = np.random.default_rng(0)
    (scratch / cfg.DATASET.TRAIN_SPLIT).mkdir(parents=True)
    for index in range(2):
        raw, labels = random_volume(shape, rng)
        with h5py.File(scratch / cfg.DATASET.TRAIN_SPLIT / f"random_{index}.hdf", "w") as handle:
            handle[cfg.DATASET.RAW_KEY] = raw
            handle[cfg.DATASET.LABEL_KEY] = labels
    return ["DATASET.DATA_ROOT", str(scratch), "DATASET.PADDING", "[0, 0, 0]"]


def time_augmentations(cfg: CfgNode, repeats: int) -> list[tuple[str, float]]:
    """(name, ms per patch) of each augmentation at P = 1 on a patch with the pipeline's margin."""
    compose = build_augmentor(cfg)
    margin = compose.margin
    shape = tuple(s + 2 * m for s, m in zip(cfg.MODEL.INPUT_SIZE, margin))
    rng = np.random.default_rng(0)
    raw = rng.random(shape, dtype=np.float32)
    labels = rng.integers(1, 50, shape).astype(np.uint32)
    rows = []
    for transform in compose.transforms:
        transform.p = 1.0
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            transform(raw, labels, rng)
            times.append(time.perf_counter() - start)
        rows.append((type(transform).__name__, 1000 * statistics.median(times)))
    return rows


def loader_rate(cfg: CfgNode, num_workers: int, batches: int) -> float:
    """Samples per second of the training loader after one warm-up batch."""
    cfg.defrost()
    cfg.HARDWARE.NUM_WORKERS = num_workers
    cfg.freeze()
    iterator = iter(build_train_loader(cfg))
    # Warm-up: worker start-up, then drain the batches prefetched meanwhile (2 per worker) so
    # that the timed batches measure production, not the queue.
    for _ in range(1 + 2 * num_workers):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return batches * cfg.OPTIM.BATCH_SIZE / elapsed


def step_time(cfg: CfgNode, steps: int) -> tuple[float, str]:
    """Median seconds of forward + backward + optimizer step on one loader batch, and the device."""
    from melecole.losses import build_criterion
    from melecole.models import build_model

    device = resolve_device(cfg.HARDWARE.DEVICE)
    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.OPTIM.INITIAL_LR)
    cfg.defrost()
    cfg.HARDWARE.NUM_WORKERS = 0
    cfg.freeze()
    batch = next(iter(build_train_loader(cfg)))
    raw, labels = batch["raw"].to(device), batch["labels"].to(device)
    times = []
    for index in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = criterion(model(raw), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times), str(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic-UNet3D.yaml")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per augmentation")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[32, 160, 160], metavar=("Z", "Y", "X"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the step (0 = default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    config = Path(arguments.config)
    if not config.is_file():
        print(f"# {config} not found: using the default config", file=sys.stderr)
    enable_all = [item for group in GROUPS for item in (f"AUGMENTATION.{group}.ENABLED", "True")]
    opts = ["AUGMENTATION.ENABLED", "True", *enable_all, *arguments.opts]
    cfg = load_cfg(config if config.is_file() else None, opts)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        extra = ensure_data(cfg, tuple(arguments.volume_shape), Path(scratch))
        cfg = load_cfg(config if config.is_file() else None, opts + extra, freeze=True)
        batch = cfg.OPTIM.BATCH_SIZE
        print(f"# config {config}, patch {list(cfg.MODEL.INPUT_SIZE)}, batch {batch}, "
              f"augmentation margin {build_augmentor(cfg).margin}, torch threads {torch.get_num_threads()}")
        rows = [(f"augment {name} (P=1)", f"{ms:8.2f} ms/patch", "") for name, ms in
                time_augmentations(cfg, arguments.repeats)]
        for workers in (0, 2):
            try:
                rate = loader_rate(cfg, workers, arguments.batches)
            except DataError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            per_sample = f"{1000 / rate:7.1f} ms/sample"
            rows.append((f"loader, {workers} workers", f"{rate:8.1f} samples/s", per_sample))
        try:
            seconds, device = step_time(cfg, arguments.steps)
            rows.append((f"train step on {device} (B={batch})", f"{batch / seconds:8.1f} samples/s",
                         f"{1000 * seconds:7.1f} ms/step"))
        except (ImportError, AttributeError) as error:
            rows.append(("train step", "skipped", f"models/losses not available: {error}"))
    width = max(len(row[0]) for row in rows)
    print(f"{'what':<{width}}  {'rate':>20}  {'time':>16}")
    for name, rate, per in rows:
        print(f"{name:<{width}}  {rate:>20}  {per:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
