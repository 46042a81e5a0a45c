"""The whole pipeline on one config: data -> train -> infer the val split -> evaluate -> one table.

    python -m melecole.demo --config configs/synthetic-UNet3D.yaml      # what `make demo` runs
    python -m melecole.demo --config configs/fib-gala-UNet3D.yaml
    python -m melecole.demo --config CONFIG --checkpoint RUN/checkpoints/last.pt   # skip training

The synthetic dataset is generated first when DATASET.DATA_ROOT does not exist and the config
points at the synthetic set. The table compares embeddings + mutex watershed (at
INFERENCE.MWS_BACKGROUND, not tuned on val) with the connected-components baseline on the same
foreground probability (best of several thresholds, i.e. an optimistic baseline, with the same
small-segment removal and background filling as the watershed).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np

from melecole.config import load_cfg
from melecole.data.synthetic import ensure_synthetic_data
from melecole.utils.cli import add_config_arguments, run_cli
from melecole.utils.files import atomic_write_text
from melecole.utils.logger import get_logger, setup_logging

__all__ = ["BASELINE_THRESHOLDS", "ensure_synthetic_data", "format_table", "main", "score_volume"]

BASELINE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def score_volume(segmentation_file: Path, membranes_file: Path, gt: np.ndarray, cfg) -> dict[str, dict]:
    """Scores of the MWS segmentation and of the best connected-components baseline; the baseline
    gets the same post-processing as the watershed (INFERENCE.MIN_SEGMENT_SIZE, FILL_BACKGROUND, FILL_MODE)."""
    from melecole.evaluation import best_threshold_baseline, evaluate_segmentation
    from melecole.inference.outputs import MEMBRANES_KEY, SEGMENTATION_KEY
    from melecole.io import open_hdf5_volume
    from melecole.segmentation.postprocess import fill_heightmap, postprocess_segmentation

    segmentation = open_hdf5_volume(segmentation_file, SEGMENTATION_KEY).read()
    foreground = open_hdf5_volume(membranes_file, MEMBRANES_KEY).read().astype(np.float32)
    rows = {"embeddings + MWS": evaluate_segmentation(segmentation, gt, top_k=0).to_dict()}
    postprocess = functools.partial(
        postprocess_segmentation, min_size=cfg.INFERENCE.MIN_SEGMENT_SIZE, fill=cfg.INFERENCE.FILL_BACKGROUND,
        heightmap=fill_heightmap(foreground, cfg.INFERENCE.FILL_MODE),
    )
    best = best_threshold_baseline(foreground, gt, BASELINE_THRESHOLDS, postprocess=postprocess)
    rows[f"CC baseline (best t={best.threshold})"] = {**best.scores.to_dict(), "threshold": best.threshold}
    return rows


def format_table(rows: dict[str, dict]) -> str:
    header = f"{'method':<32} {'VI split':>9} {'VI merge':>9} {'VI total':>9} {'ARAND':>7} {'#seg':>6} {'#gt':>5}"
    lines = [header, "-" * len(header)]
    for name, scores in rows.items():
        lines.append(
            f"{name:<32} {scores['vi_split']:>9.4f} {scores['vi_merge']:>9.4f} {scores['vi_total']:>9.4f} "
            f"{scores['arand']:>7.4f} {scores['n_seg']:>6d} {scores['n_gt']:>5d}"
        )
    return "\n".join(lines)


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="skip training and use this checkpoint (file or run folder)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    from melecole.data.volume import list_volumes, read_volume
    from melecole.engine.trainer import Trainer
    from melecole.inference.pipeline import run_inference

    setup_logging()
    logger = get_logger()
    cfg = load_cfg(args.config, args.opts)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ensure_synthetic_data(cfg.DATASET.DATA_ROOT, cfg.SYSTEM.SEED)
    timings["data"] = time.perf_counter() - start

    checkpoint = args.checkpoint
    if checkpoint is None:
        start = time.perf_counter()
        trainer = Trainer(cfg)
        history = trainer.train(keep_history=True)  # the demo logs first vs last 10 % of the losses
        timings["train"] = time.perf_counter() - start
        checkpoint = trainer.run_dir / "checkpoints" / "last.pt"
        tenth = max(1, len(history) // 10)
        logger.info(
            "mean loss: first 10%% of iterations %.4f, last 10%% %.4f",
            np.mean([h["loss"] for h in history[:tenth]]), np.mean([h["loss"] for h in history[-tenth:]]),
        )

    start = time.perf_counter()
    split = cfg.DATASET.VAL_SPLIT
    results = run_inference(cfg, checkpoint, split=split, evaluate=False, progress=cfg.LOG.PROGRESS_BAR)
    timings["infer"] = time.perf_counter() - start

    start = time.perf_counter()
    files = list_volumes(cfg.DATASET.DATA_ROOT, split)
    report = {}
    for result, path in zip(results, files):
        volume = read_volume(path, cfg.DATASET.RAW_KEY, cfg.DATASET.LABEL_KEY, cfg.DATASET.PADDING)
        rows = score_volume(result.segmentation, result.membranes, volume.labels, cfg)
        timings["evaluate"] = time.perf_counter() - start
        print(f"\n{cfg.LOG.RUN_NAME}: {split} volume {path.name} (VI in bits, lower is better)")
        print(format_table(rows))
        report[str(path)] = rows
        json_path = result.segmentation.parent / f"{result.name}_demo_scores.json"
        atomic_write_text(json_path, json.dumps({"scores": rows, "timings_s": timings}, indent=2))
        print(f"scores written to {json_path}")
    print("timings (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()))
    return 0
