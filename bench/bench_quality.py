"""Segmentation quality: learning curve of a config on a val split, next to an oracle threshold baseline.

Trains a config for ``--iterations`` (or until ``--minutes`` of training time have passed, checked at
every evaluation point) and, every ``--eval-every`` iterations, runs the full inference pipeline
(``melecole.inference.run_inference``: sliding windows -> affinities -> mutex watershed ->
post-processing) on the val split and scores it (VI split / merge in bits, adapted Rand error).
Only the split's first volume is scored; evaluation time is not counted as training time. The
baseline is model-free and oracle-tuned: the gaussian-smoothed raw, thresholded at the best of
several levels chosen on the val volume itself, connected components
(melecole.evaluation.connected_components_baseline), best of with / without the pipeline's
small-segment removal and background filling.

    python bench/bench_quality.py --config configs/medulla-UNet3D.yaml --out /tmp/q/medulla \
        --iterations 3000 --eval-every 500 [KEY VALUE ...]
    python bench/bench_quality.py --config configs/fib-gala-UNet3D.yaml --out /tmp/q/gala --minutes 30
    python bench/bench_quality.py --config configs/synthetic-UNet3D.yaml --out /tmp/q/syn --iterations 1000
    # evaluate an existing checkpoint only, with a grid of post-processing overrides:
    python bench/bench_quality.py --config RUN/config.yaml --out /tmp/q/pp --checkpoint CKPT \
        --variants "" "INFERENCE.MIN_SEGMENT_SIZE 200" -- [KEY VALUE ...]

With ``--minutes``, OPTIM.TOTAL_ITER still sets the learning-rate schedule: choose it near
(iterations per second) x 60 x minutes. Trailing KEY VALUE pairs override the config.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from melecole.config import load_cfg
from melecole.data import build_train_loader
from melecole.data.synthetic import ensure_synthetic_data
from melecole.data.volume import list_volumes, read_volume
from melecole.engine.trainer import Trainer
from melecole.evaluation import best_threshold_baseline
from melecole.inference import run_inference
from melecole.segmentation.postprocess import postprocess_segmentation

BASELINE_SIGMAS = (1.0, 2.0)
BASELINE_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5)
HEADER = (
    f"{'iteration':>9} {'train min':>9} {'it/s':>6} {'pull':>6} {'push':>6} {'reg':>6} {'aff':>6} "
    f"{'VI split':>8} {'VI merge':>8} {'VI total':>8} {'ARAND':>6} {'#seg':>6} {'infer s':>7}"
)


def val_volume(cfg, split: str):
    """The (first) labelled volume of the split."""
    files = list_volumes(cfg.DATASET.DATA_ROOT, split)
    return read_volume(files[0], cfg.DATASET.RAW_KEY, cfg.DATASET.LABEL_KEY, cfg.DATASET.PADDING)


def oracle_baseline(volume, cfg) -> dict[str, dict]:
    """Best (lowest VI total) CC segmentation of the smoothed raw over sigmas x thresholds, without
    and with the pipeline's post-processing (INFERENCE.MIN_SEGMENT_SIZE, background filled), through
    the library's one baseline (:func:`melecole.evaluation.best_threshold_baseline`).

    Thresholds are quantiles of the smoothed raw; the brighter side is foreground (membranes are dark).
    """
    raw = volume.raw[volume.label_region].astype(np.float32)
    fill = functools.partial(postprocess_segmentation, min_size=cfg.INFERENCE.MIN_SEGMENT_SIZE, fill=True)
    best: dict[str, dict] = {}
    for sigma in BASELINE_SIGMAS:
        smooth = ndimage.gaussian_filter(raw, sigma)
        thresholds = [float(np.quantile(smooth, quantile)) for quantile in BASELINE_QUANTILES]
        for name, postprocess in (("CC", None), ("CC + fill", fill)):
            result = best_threshold_baseline(smooth, volume.labels, thresholds, postprocess=postprocess)
            scores = result.scores.to_dict()
            scores.update(sigma=sigma, quantile=BASELINE_QUANTILES[thresholds.index(result.threshold)])
            if name not in best or scores["vi_total"] < best[name]["vi_total"]:
                best[name] = scores
    return best


def evaluate_checkpoint(cfg, checkpoint: Path, out: Path, split: str) -> dict:
    """Full inference pipeline on the split; scores of the 'segmentation' dataset plus timing."""
    start = time.perf_counter()
    results = run_inference(cfg, checkpoint, split=split, output_dir=out, progress=False)
    scores = dict(results[0].scores["segmentation"])
    scores["vi_total"] = scores["vi_split"] + scores["vi_merge"]
    scores["infer_s"] = time.perf_counter() - start
    with h5py.File(results[0].segmentation, "r") as handle:
        scores["n_seg"] = int(handle["segmentation"].attrs["num_segments"])
    scores["files"] = {"affinities": str(results[0].affinities), "membranes": str(results[0].membranes)}
    return scores


def evaluate_fragment_graph(cfg, files: dict, labels: np.ndarray) -> dict:
    """The blockwise fragment-graph algorithm (melecole.blockwise, in memory, one block per 32 x 256 x 256)
    on stored affinities and foreground: BLOCKWISE.* and INFERENCE.* post-processing keys of ``cfg``."""
    from melecole.blockwise.plan import build_options
    from melecole.blockwise.segment import segment_blockwise_in_memory
    from melecole.evaluation import evaluate_segmentation
    from melecole.io import open_volume

    affinities = open_volume(files["affinities"], "affinities").read()
    foreground = open_volume(files["membranes"], "membranes").read()
    options = build_options(cfg, block_shape=(32, 256, 256))
    start = time.perf_counter()
    segmentation, table = segment_blockwise_in_memory(affinities, options, foreground)
    result = evaluate_segmentation(segmentation, labels, top_k=0)
    return {
        "vi_split": result.vi_split, "vi_merge": result.vi_merge, "vi_total": result.vi_split + result.vi_merge,
        "arand": result.arand, "n_seg": int(table.num_segments), "infer_s": time.perf_counter() - start,
    }


def format_row(row: dict) -> str:
    return (
        f"{row['iteration']:>9} {row['train_min']:>9.1f} {row['its']:>6.2f} {row['pull']:>6.3f} {row['push']:>6.3f} "
        f"{row['reg']:>6.2f} {row['aff']:>6.3f} {row['vi_split']:>8.3f} {row['vi_merge']:>8.3f} "
        f"{row['vi_total']:>8.3f} "
        f"{row['arand']:>6.3f} {row['n_seg']:>6} {row['infer_s']:>7.0f}"
    )


def learning_curve(cfg, args, out: Path) -> list[dict]:
    """Trains in chunks of --eval-every iterations, evaluating after each; returns the table rows."""
    trainer = Trainer(cfg, run_dir=out / "run")
    total = min(args.iterations or cfg.OPTIM.TOTAL_ITER, cfg.OPTIM.TOTAL_ITER)
    rows, train_seconds = [], 0.0
    print(HEADER, flush=True)
    while trainer.iteration < total:
        target = min(total, trainer.iteration + args.eval_every)
        start_iteration, start = trainer.iteration, time.perf_counter()
        recent = trainer.train(stop_at=target, keep_history=True)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        # train() re-iterates the loader from its start index: continue the patch stream instead.
        trainer.train_loader = build_train_loader(cfg, start_iteration=trainer.iteration)
        checkpoint = trainer.save_checkpoint(final=trainer.iteration == cfg.OPTIM.TOTAL_ITER)
        row = {
            "iteration": trainer.iteration,
            "train_min": train_seconds / 60.0,
            "its": (trainer.iteration - start_iteration) / max(seconds, 1e-9),
            **{key: float(np.mean([h.get(name, np.nan) for h in recent])) for key, name in
               (("pull", "pull"), ("push", "push"), ("reg", "regularizer"), ("aff", "affinity"))},
        }
        row.update(evaluate_checkpoint(cfg, checkpoint, out / "eval", args.split))
        row.pop("files")
        rows.append(row)
        print(format_row(row), flush=True)
        if args.minutes and train_seconds >= 60.0 * args.minutes:
            break
    return rows


def print_scores(name: str, scores: dict) -> None:
    print(
        f"{name:<60} VI split {scores['vi_split']:.3f} merge {scores['vi_merge']:.3f} "
        f"total {scores['vi_total']:.3f} ARAND {scores['arand']:.3f} #seg {scores['n_seg']} "
        f"({scores['infer_s']:.0f} s)",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="folder for the run, evaluations and scores.json")
    parser.add_argument("--iterations", type=int, default=0, help="stop here (default OPTIM.TOTAL_ITER)")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop at the first evaluation after this")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", help="skip training: evaluate this checkpoint (with --variants)")
    parser.add_argument("--variants", nargs="*", default=[""], help="quoted 'KEY VALUE ...' override sets")
    parser.add_argument(
        "--graph-variants", nargs="*", default=[],
        help="with --checkpoint: quoted 'KEY VALUE ...' sets (e.g. 'BLOCKWISE.FRAGMENTS watershed') segmented "
        "by the blockwise fragment-graph algorithm on the affinities of the first --variants entry",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    if args.opts[:1] == ["--"]:  # "--" ends a --variants list
        args.opts = args.opts[1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_cfg(args.config, args.opts)
    ensure_synthetic_data(cfg.DATASET.DATA_ROOT, cfg.SYSTEM.SEED)
    report: dict = {"config": args.config, "opts": args.opts}
    if not args.no_baseline:
        report["baseline"] = oracle_baseline(val_volume(cfg, args.split), cfg)
        for name, best in report["baseline"].items():
            print(
                f"oracle baseline {name} ({args.split}; smoothed raw sigma {best['sigma']}, quantile "
                f"{best['quantile']}): VI split {best['vi_split']:.3f} merge {best['vi_merge']:.3f} "
                f"total {best['vi_total']:.3f} ARAND {best['arand']:.3f}",
                flush=True,
            )
    if args.checkpoint:
        report["variants"], files = {}, None
        for variant in args.variants:
            variant_cfg = load_cfg(args.config, args.opts + shlex.split(variant))
            scores = evaluate_checkpoint(variant_cfg, Path(args.checkpoint), out / "eval", args.split)
            files = files or scores.pop("files")
            report["variants"][variant or "(config)"] = scores
            print_scores(variant or "(config)", scores)
        labels = val_volume(cfg, args.split).labels if args.graph_variants else None
        for variant in args.graph_variants:
            variant_cfg = load_cfg(args.config, args.opts + shlex.split(variant))
            scores = evaluate_fragment_graph(variant_cfg, files, labels)
            report["variants"][f"fragment graph: {variant}"] = scores
            print_scores(f"fragment graph: {variant}", scores)
    else:
        report["curve"] = learning_curve(cfg, args, out)
    (out / "scores.json").write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
