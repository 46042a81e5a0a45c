"""Label efficiency of dense MoCo on synthetic data: one small labelled volume, several unlabelled.

Arms, each with the same number of optimizer steps (ITERATIONS) and seeds:
  supervised          metric loss on the labelled volume only
  pretrain+finetune   MOCO.MODE pretrain for PRETRAIN_FRACTION * ITERATIONS steps on the unlabelled
                      (and the labelled volume's raw), then supervised fine-tuning (--ssl_checkpoint)
                      for the rest
  joint               metric loss + MOCO.WEIGHT * InfoNCE for ITERATIONS steps
and, only with --arms, a diagnostic arm outside the equal budget:
  pretrain-extra+finetune  the pre-training of pretrain+finetune (reused when present), then
                      fine-tuning for all ITERATIONS steps: does the pre-trained start help at all?
Each trained model is run through the inference pipeline (sliding windows -> affinities -> mutex
watershed) on the synthetic val volume and scored with melecole.evaluation (VI in bits, ARAND).

    python bench/bench_moco_label_efficiency.py --out /tmp/moco-bench [--seeds 0 1 2] [--iterations 720]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from melecole.config import load_cfg
from melecole.data.synthetic import generate_volume, write_dataset_file
from melecole.engine.trainer import Trainer
from melecole.inference import run_inference

REPO = Path(__file__).resolve().parents[1]
ARMS = ("supervised", "pretrain+finetune", "joint")
EXTRA_ARMS = ("pretrain-extra+finetune",)


def make_data(root: Path, labelled_shape: list[int], volume_shape: list[int], unlabelled: int, seed: int) -> None:
    """train/ one small labelled volume, val/ one volume, unlabeled/ volumes (labels not used)."""
    jobs = [("train", 0, labelled_shape, True), ("val", 0, volume_shape, False)]
    jobs += [("unlabeled", index, volume_shape, True) for index in range(unlabelled)]
    for folder, index, shape, defects in jobs:
        path = root / folder / f"synthetic_{folder}_{index:02d}.hdf"
        if not path.is_file():
            volume_seed = 1000 * seed + 100 * ("train", "val", "unlabeled").index(folder) + index
            raw, labels = generate_volume(shape, seed=volume_seed, defects=defects)
            write_dataset_file(path, raw, labels)


def train(options: dict, out: Path, ssl_checkpoint: Path | None = None) -> tuple[Path, float]:
    """Trains one config (synthetic-MoCo.yaml + ``options``); returns (last checkpoint, seconds)."""
    opts = [item for pair in options.items() for item in (pair[0], str(pair[1]))]
    cfg = load_cfg(REPO / "configs" / "synthetic-MoCo.yaml", opts)
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir=out, ssl_checkpoint=ssl_checkpoint)
    trainer.train()
    return out / "checkpoints" / "last.pt", time.perf_counter() - start


def evaluate(options: dict, checkpoint: Path) -> dict[str, float]:
    opts = [item for pair in options.items() for item in (pair[0], str(pair[1]))]
    cfg = load_cfg(REPO / "configs" / "synthetic-MoCo.yaml", opts)
    result = run_inference(cfg, checkpoint, split="val", progress=False)[0]
    scores = dict(result.scores["segmentation"])
    scores["vi_total"] = scores["vi_split"] + scores["vi_merge"]
    return scores


def run_arm(arm: str, seed: int, base: dict, iterations: int, pretrain_fraction: float, out: Path) -> dict:
    common = {**base, "SYSTEM.SEED": seed}
    supervised = {**common, "MOCO.ENABLED": False, "OPTIM.TOTAL_ITER": iterations}
    seconds = 0.0
    if arm == "supervised":
        checkpoint, seconds = train(supervised, out / "supervised")
    elif arm == "joint":
        checkpoint, seconds = train({**common, "MOCO.MODE": "joint", "OPTIM.TOTAL_ITER": iterations}, out / "joint")
    else:
        pretrain_steps = int(round(pretrain_fraction * iterations))
        pretrain_dir = out.parent / "pretrain-finetune" / "pretrain"
        ssl = pretrain_dir / "checkpoints" / "last.pt"
        timing = pretrain_dir / "train_seconds.json"
        if arm == "pretrain+finetune" or not timing.is_file():
            ssl, seconds = train({**common, "MOCO.MODE": "pretrain", "OPTIM.TOTAL_ITER": pretrain_steps},
                                 pretrain_dir)
            timing.write_text(json.dumps(seconds))
        else:  # the diagnostic arm reuses the equal-budget arm's pre-training
            seconds = json.loads(timing.read_text())
        finetune_steps = iterations if arm == "pretrain-extra+finetune" else iterations - pretrain_steps
        finetune = {**supervised, "OPTIM.TOTAL_ITER": finetune_steps}
        checkpoint, more = train(finetune, out / "finetune", ssl_checkpoint=ssl)
        seconds += more
    scores = evaluate(supervised, checkpoint)
    return {"arm": arm, "seed": seed, "train_seconds": seconds, **scores}


def summarise(records: list[dict]) -> str:
    """Markdown table: mean ± std over seeds per arm."""
    metrics = ("vi_split", "vi_merge", "vi_total", "arand", "train_seconds")
    lines = ["| arm | seeds | VI split | VI merge | VI total | ARAND | train s |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS + EXTRA_ARMS:
        rows = [r for r in records if r["arm"] == arm]
        if not rows:
            continue
        cells = []
        for metric in metrics:
            values = np.array([r[metric] for r in rows], dtype=np.float64)
            spread = values.std(ddof=1) if len(values) > 1 else math.nan
            digits = 0 if metric == "train_seconds" else 3
            cells.append(f"{values.mean():.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-moco-label-efficiency"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + EXTRA_ARMS)
    parser.add_argument("--iterations", type=int, default=720, help="optimizer steps per arm")
    parser.add_argument("--pretrain-fraction", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--labelled-shape", type=int, nargs=3, default=[16, 96, 96])
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[32, 128, 128])
    parser.add_argument("--unlabelled", type=int, default=4, help="unlabelled volumes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for all arms")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = args.out / "data"
    make_data(data, args.labelled_shape, args.volume_shape, args.unlabelled, args.data_seed)
    base = {
        "DATASET.DATA_ROOT": data,
        "DATASET.UNLABELED_DATA_ROOT": data / "unlabeled",
        "HARDWARE.DEVICE": "cpu",
        "HARDWARE.NUM_WORKERS": 0,
        "OPTIM.WARMUP_ITER": max(1, args.iterations // 20),
        "LOG.VAL_FREQUENCY": 0,
        "LOG.IMAGE_FREQUENCY": 0,
        "LOG.CHECKPOINT_FREQUENCY": 0,
        "LOG.LOG_FREQUENCY": max(1, args.iterations // 4),
        "LOG.PROGRESS_BAR": False,
        "INFERENCE.WINDOW_SIZE": "[16, 64, 64]",
        **dict(zip(args.opts[0::2], args.opts[1::2])),
    }
    records = []
    started = time.perf_counter()
    for seed in args.seeds:
        for arm in args.arms:
            out = args.out / f"seed{seed}" / arm.replace("+", "-")
            record = run_arm(arm, seed, base, args.iterations, args.pretrain_fraction, out)
            records.append(record)
            print(json.dumps(record), flush=True)
    results = args.out / "results.json"
    if results.is_file():  # keep the records of other arms / seeds from earlier invocations
        done = {(r["arm"], r["seed"]) for r in records}
        records = [r for r in json.loads(results.read_text()) if (r["arm"], r["seed"]) not in done] + records
    results.write_text(json.dumps(records, indent=1))
    print(summarise(records))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
