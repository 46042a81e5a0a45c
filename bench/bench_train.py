"""Training speed of the shipped recipes: it/s with the old thread rule vs HARDWARE.NUM_THREADS auto.

Before: auto left one core per DataLoader worker, so a 2-core machine with NUM_WORKERS 1 trained on one
thread. After: auto gives every core to the model (melecole.utils.device.configure_threads). Each
recipe trains ``--iterations`` steps per setting in this process (fresh model, same seed, no
validation, no checkpoints); the first ``--warmup`` steps are not timed. The table also gives the
share of the timed steps spent waiting for the data loader (is the loader the bottleneck?).

    python bench/bench_train.py                       # synthetic, fib-gala, medulla; 1 vs all threads
    python bench/bench_train.py --recipes configs/medulla-UNet3D.yaml --iterations 80
    python bench/bench_train.py --variants old auto cl3d compile   # + channels-last 3D, torch.compile

Variants: ``old`` = 1 thread (the old rule), ``auto`` = every core, ``cl3d`` = auto with
``HARDWARE.CHANNELS_LAST True`` (the model's weights in channels-last 3D memory format: the
convolutions then run channels-last), ``compile`` = auto with ``torch.compile(model)`` (compiled in
the untimed warm-up steps; the warm-up time is printed). The first variant is the ratios' reference.

Run it on a quiet machine: a contended timing is not a measurement.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

RECIPES = ("configs/synthetic-UNet3D.yaml", "configs/fib-gala-UNet3D.yaml", "configs/medulla-UNet3D.yaml")


def synthetic_root(folder: str) -> str:
    """The synthetic dataset (generated into ``folder`` the first time, as ``make demo`` does)."""
    from pathlib import Path

    from melecole.data.synthetic import DEFAULT_DEFECT_SPLITS, DEFAULT_SHAPE, generate_dataset

    if (Path("dataset/synthetic") / "train").is_dir():  # made by `make demo`
        return "dataset/synthetic"
    root = Path(folder) / "synthetic"
    if not (root / "train").is_dir():
        generate_dataset(str(root), 0, shape=DEFAULT_SHAPE, defect_splits=DEFAULT_DEFECT_SPLITS)
    return str(root)


VARIANTS = {"old": "old rule (1)", "auto": "auto (all)", "cl3d": "auto + channels-last 3D",
            "compile": "auto + torch.compile"}  # fmt: skip


def time_recipe(config: str, variant: str, iterations: int, warmup: int, data: str) -> dict[str, float]:
    """Steps per second after ``warmup`` steps, the loader's share of that time, the warm-up seconds."""
    import torch

    from melecole.config import load_cfg
    from melecole.engine.trainer import Trainer

    extra = ["DATASET.DATA_ROOT", synthetic_root(data)] if "synthetic" in config else []
    with tempfile.TemporaryDirectory() as folder:
        threads = "1" if variant == "old" else "0"
        cfg = load_cfg(config, extra + [
            "HARDWARE.NUM_THREADS", threads, "HARDWARE.CHANNELS_LAST", str(variant == "cl3d"),
            "LOG.OUTPUT_PATH", folder, "LOG.PROGRESS_BAR", "false",
            "LOG.VAL_FREQUENCY", "0", "LOG.IMAGE_FREQUENCY", "0", "LOG.CHECKPOINT_FREQUENCY", "0",
        ])
        trainer = Trainer(cfg)
        if variant == "compile":
            trainer.model = torch.compile(trainer.model)
        start = time.perf_counter()
        trainer.train(stop_at=warmup)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        trainer.train_loader = _loader_from(cfg, trainer.iteration)
        trainer.train(stop_at=warmup + iterations)
        seconds = time.perf_counter() - start
        return {"its": iterations / seconds, "threads": torch.get_num_threads(),
                "loader": trainer.loader_wait_s / seconds, "seconds": seconds, "warmup_s": warmup_s}


def _loader_from(cfg, iteration: int):
    from melecole.engine.loaders import build_training_loader

    return build_training_loader(cfg, iteration, 0, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["old", "auto"],
                        help="the first one is the reference of the ratio column")  # fmt: skip
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)
    data = tempfile.mkdtemp(prefix="bench_train_")
    reference = args.variants[0]
    print(f"{'recipe':<34} {'threads':>7} {'it/s':>6} {'x ' + reference:>8} {'loader wait':>11} {'warm-up s':>9}")
    for recipe in args.recipes:
        rows = {variant: time_recipe(recipe, variant, args.iterations, args.warmup, data) for variant in args.variants}
        for variant, row in rows.items():
            print(f"{recipe.split('/')[-1]:<34} {row['threads']:>7} {row['its']:>6.2f} "
                  f"{row['its'] / rows[reference]['its']:>8.2f} {100 * row['loader']:>10.1f}% "
                  f"{row['warmup_s']:>9.1f}  {VARIANTS[variant]}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
