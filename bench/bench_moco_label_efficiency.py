"""Label efficiency of dense MoCo: few labels, more unlabelled data; synthetic or the real medulla.

Arms (each the same number of optimizer steps, or with ``--minutes`` the same CPU time):
  supervised          metric loss on the labelled data only
  pretrain+finetune   MOCO.MODE pretrain (unlabelled volumes + the labelled raw) for PRETRAIN_FRACTION of
                      the budget, then supervised fine-tuning (--ssl_checkpoint) for the rest
  joint               metric loss + MOCO.WEIGHT * InfoNCE, each step one labelled and one view-pair batch
and, only with --arms, a diagnostic arm outside the equal budget:
  pretrain-extra+finetune  the pre-training of pretrain+finetune (reused when present), then
                      fine-tuning for the whole budget: does the pre-trained start help at all?
Each trained model is run through the config's inference pipeline on the val split and scored with
melecole.evaluation (VI in bits, ARAND).

--dataset synthetic (configs/synthetic-MoCo.yaml): one small generated labelled volume, several
  generated unlabelled volumes, one generated val volume.
--dataset medulla (configs/medulla-MoCo.yaml): labels only for the first --labelled-sections sections of
  ../shared/data/medulla/train, unlabelled ../shared/data/medulla-unlabeled, scored on medulla/val with the
  shipped inference settings.

With ``--minutes M`` the cost per step of each mode (supervised, joint, pretrain) is measured once
(``<out>/budget.json``) and every arm gets M minutes' worth of steps, the same for every seed. Each
finished run writes ``<out>/seed<S>/<arm>/record.json`` and is skipped when run again, so seeds and
arms can run as parallel invocations on one ``--out`` (a run in progress is claimed in its
``running.pid``); the table covers every record there.

    python bench/bench_moco_label_efficiency.py --out /tmp/moco-bench [--seeds 0 1 2] [--iterations 720]
    python bench/bench_moco_label_efficiency.py --dataset medulla --out /tmp/moco-medulla --minutes 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from melecole.config import load_cfg
from melecole.data.synthetic import generate_volume, write_dataset_file
from melecole.engine.trainer import Trainer
from melecole.inference import run_inference
from melecole.utils.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ARMS = ("supervised", "pretrain+finetune", "joint")
EXTRA_ARMS = ("pretrain-extra+finetune",)
CONFIGS = {"synthetic": REPO / "configs" / "synthetic-MoCo.yaml", "medulla": REPO / "configs" / "medulla-MoCo.yaml"}
MEDULLA = REPO.parent / "shared" / "data" / "medulla"
CALIBRATION_STEPS = (3, 20)  # warm-up steps, then timed steps
# The step counts (keys of budget_steps) each arm trains for, in order.
ARM_STEPS = {"supervised": ("supervised",), "joint": ("joint",), "pretrain+finetune": ("pretrain", "finetune"),
             "pretrain-extra+finetune": ("pretrain", "supervised")}


def make_synthetic(root: Path, labelled_shape: list[int], volume_shape: list[int], unlabelled: int, seed: int) -> dict:
    """train/ one small labelled volume, val/ one volume, unlabeled/ volumes (labels not used)."""
    jobs = [("train", 0, labelled_shape, True), ("val", 0, volume_shape, False)]
    jobs += [("unlabeled", index, volume_shape, True) for index in range(unlabelled)]
    for folder, index, shape, defects in jobs:
        path = root / folder / f"synthetic_{folder}_{index:02d}.hdf"
        if not path.is_file():
            volume_seed = 1000 * seed + 100 * ("train", "val", "unlabeled").index(folder) + index
            raw, labels = generate_volume(shape, seed=volume_seed, defects=defects)
            write_dataset_file(path, raw, labels)
    return {"DATASET.DATA_ROOT": root, "DATASET.UNLABELED_DATA_ROOT": root / "unlabeled",
            "INFERENCE.WINDOW_SIZE": "[16, 64, 64]"}


def make_medulla(root: Path, sections: int) -> dict:
    """train/ the first ``sections`` sections of medulla/train (raw and labels), val/ medulla/val (linked)."""
    source = MEDULLA / "train" / "medulla_train.hdf"
    if not source.is_file():
        raise SystemExit(f"--dataset medulla: '{source}' not found (../shared/data/medulla)")
    train = root / "train" / f"medulla_train_first{sections}.hdf"
    if not train.is_file():
        with h5py.File(source, "r") as handle:
            if not 0 < sections <= handle["labels"].shape[0]:
                raise SystemExit(f"--labelled-sections: expected 1-{handle['labels'].shape[0]}, got {sections}")
            raw, labels = handle["volume"][:sections], handle["labels"][:sections]
        train.parent.mkdir(parents=True, exist_ok=True)
        write_dataset_file(train, raw, labels, {"source": str(source), "sections": f"z < {sections}"})
    val = root / "val" / "medulla_val.hdf"
    if not val.exists():
        val.parent.mkdir(parents=True, exist_ok=True)
        val.symlink_to(MEDULLA / "val" / "medulla_val.hdf")
    return {"DATASET.DATA_ROOT": root}


def config(dataset: str, options: dict):
    opts = [item for pair in options.items() for item in (pair[0], str(pair[1]))]
    return load_cfg(CONFIGS[dataset], opts)


def train(dataset: str, options: dict, steps: int, out: Path, ssl_checkpoint: Path | None = None) -> tuple[Path, float]:
    """Trains ``steps`` steps of the dataset's MoCo config + ``options``; returns (last checkpoint, seconds)."""
    options = {**options, "OPTIM.TOTAL_ITER": steps, "OPTIM.WARMUP_ITER": max(1, steps // 20)}
    start = time.perf_counter()
    Trainer(config(dataset, options), run_dir=out, ssl_checkpoint=ssl_checkpoint).train()
    return out / "checkpoints" / "last.pt", time.perf_counter() - start


def mode_options(mode: str) -> dict:
    if mode == "supervised":
        return {"MOCO.ENABLED": False}
    return {"MOCO.ENABLED": True, "MOCO.MODE": mode}


def seconds_per_step(dataset: str, base: dict, out: Path) -> dict[str, float]:
    """Measured once per --out (budget.json): seconds per optimizer step of each training mode."""
    path = out / "budget.json"
    if path.is_file():
        return json.loads(path.read_text())
    warm, timed = CALIBRATION_STEPS
    costs = {}
    for mode in ("supervised", "joint", "pretrain"):
        options = {**base, **mode_options(mode), "OPTIM.TOTAL_ITER": 100_000, "LOG.CHECKPOINT_FREQUENCY": 0}
        trainer = Trainer(config(dataset, options), run_dir=out / "calibration" / mode)
        trainer.train(stop_at=warm)
        start = time.perf_counter()
        trainer.train(stop_at=warm + timed)
        costs[mode] = (time.perf_counter() - start) / timed
        print(f"calibration: {mode} {costs[mode]:.3f} s/step", flush=True)
    atomic_write_text(path, json.dumps(costs))
    return costs


def evaluate(dataset: str, options: dict, checkpoint: Path) -> dict[str, float]:
    result = run_inference(config(dataset, options), checkpoint, split="val", progress=False)[0]
    scores = dict(result.scores["segmentation"])
    scores["vi_total"] = scores["vi_split"] + scores["vi_merge"]
    return scores


def run_arm(arm: str, seed: int, dataset: str, base: dict, steps: dict[str, int], out: Path) -> dict:
    """``steps``: supervised, joint, pretrain and finetune step counts of this budget."""
    common = {**base, "SYSTEM.SEED": seed}
    supervised = {**common, **mode_options("supervised")}
    seconds = 0.0
    if arm == "supervised":
        checkpoint, seconds = train(dataset, supervised, steps["supervised"], out / "supervised")
    elif arm == "joint":
        checkpoint, seconds = train(dataset, {**common, **mode_options("joint")}, steps["joint"], out / "joint")
    else:
        pretrain_dir = out.parent / "pretrain-finetune" / "pretrain"
        ssl = pretrain_dir / "checkpoints" / "last.pt"
        timing = pretrain_dir / "train_seconds.json"
        if arm == "pretrain+finetune" or not timing.is_file():
            ssl, seconds = train(dataset, {**common, **mode_options("pretrain")}, steps["pretrain"], pretrain_dir)
            atomic_write_text(timing, json.dumps(seconds))
        else:  # the diagnostic arm reuses the equal-budget arm's pre-training
            seconds = json.loads(timing.read_text())
        finetune_steps = steps[ARM_STEPS[arm][1]]
        checkpoint, more = train(dataset, supervised, finetune_steps, out / "finetune", ssl_checkpoint=ssl)
        seconds += more
    started = time.perf_counter()
    scores = evaluate(dataset, supervised, checkpoint)
    return {"arm": arm, "seed": seed, "train_seconds": seconds, "eval_seconds": time.perf_counter() - started,
            "steps": {key: steps[key] for key in ARM_STEPS[arm]}, **scores}


def budget_steps(args, costs: dict[str, float] | None) -> dict[str, int]:
    """Step counts per mode: equal steps (--iterations) or equal CPU time (--minutes, measured costs)."""
    if costs is None:
        pretrain = int(round(args.pretrain_fraction * args.iterations))
        return {"supervised": args.iterations, "joint": args.iterations, "pretrain": pretrain,
                "finetune": args.iterations - pretrain}
    seconds = 60.0 * args.minutes
    return {
        "supervised": round(seconds / costs["supervised"]),
        "joint": round(seconds / costs["joint"]),
        "pretrain": round(args.pretrain_fraction * seconds / costs["pretrain"]),
        "finetune": round((1 - args.pretrain_fraction) * seconds / costs["supervised"]),
    }


def claim(out: Path) -> bool:
    """Claims a run for this process (``running.pid``), unless a live process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "running.pid"
    try:
        holder = int(path.read_text())
        os.kill(holder, 0)
        return holder == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass
    try:
        fd = os.open(path.with_suffix(f".{os.getpid()}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.replace(path.with_suffix(f".{os.getpid()}"), path)
    except OSError:
        return False
    return int(path.read_text()) == os.getpid()


def summarise(records: list[dict]) -> str:
    """Markdown table: mean ± std over seeds per arm."""
    metrics = ("vi_split", "vi_merge", "vi_total", "arand", "train_seconds")
    lines = ["| arm | seeds | steps | VI split | VI merge | VI total | ARAND | train s |",
             "|---|---|---|---|---|---|---|---|"]
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
        steps = " + ".join(str(v) for v in rows[0].get("steps", {}).values())
        lines.append(f"| {arm} | {len(rows)} | {steps} | " + " | ".join(cells) + " |")
    per_seed = [f"{r['arm']} seed {r['seed']}: {r['vi_total']:.3f} / {r['arand']:.3f}" for r in records]
    return "\n".join(lines) + "\n\nper seed (VI total / ARAND): " + "; ".join(per_seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="synthetic")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-moco-label-efficiency"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + EXTRA_ARMS)
    parser.add_argument("--iterations", type=int, default=720, help="optimizer steps per arm (equal steps)")
    parser.add_argument("--minutes", type=float, default=0.0, help="training minutes per arm (equal CPU time)")
    parser.add_argument("--pretrain-fraction", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0, help="synthetic: data seed")
    parser.add_argument("--labelled-shape", type=int, nargs=3, default=[16, 96, 96], help="synthetic")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[32, 128, 128], help="synthetic")
    parser.add_argument("--unlabelled", type=int, default=4, help="synthetic: unlabelled volumes")
    parser.add_argument("--labelled-sections", type=int, default=25, help="medulla: labelled sections of train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true", help="print the table of the records in --out")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for all arms")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not args.summary_only:
        data = args.out / "data"
        if args.dataset == "synthetic":
            base = make_synthetic(data, args.labelled_shape, args.volume_shape, args.unlabelled, args.data_seed)
        else:
            base = make_medulla(data, args.labelled_sections)
        base.update({
            "HARDWARE.DEVICE": "cpu",
            "HARDWARE.NUM_THREADS": args.threads,
            "LOG.VAL_FREQUENCY": 0,
            "LOG.IMAGE_FREQUENCY": 0,
            "LOG.CHECKPOINT_FREQUENCY": 0,
            "LOG.LOG_FREQUENCY": 100,
            "LOG.PROGRESS_BAR": False,
            **dict(zip(args.opts[0::2], args.opts[1::2])),
        })
        if args.dataset == "synthetic":
            base["HARDWARE.NUM_WORKERS"] = 0
        steps = budget_steps(args, seconds_per_step(args.dataset, base, args.out) if args.minutes else None)
        print("steps per mode:", json.dumps(steps), flush=True)
        started = time.perf_counter()
        for seed in args.seeds:
            for arm in args.arms:
                out = args.out / f"seed{seed}" / arm.replace("+", "-")
                if (out / "record.json").is_file():
                    print(f"{arm} seed {seed}: done before, kept", flush=True)
                    continue
                if not claim(out):
                    print(f"{arm} seed {seed}: another invocation runs it", flush=True)
                    continue
                record = run_arm(arm, seed, args.dataset, base, steps, out)
                atomic_write_text(out / "record.json", json.dumps(record))
                (out / "running.pid").unlink()
                print(json.dumps(record), flush=True)
        print(f"total {time.perf_counter() - started:.0f} s")
    records = [json.loads(path.read_text()) for path in sorted(args.out.glob("seed*/*/record.json"))]
    print(summarise(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
