"""Background fill and the settings around it, on stored infer.py outputs of trained models.

Run: ``python bench/bench_fill.py --model NAME CONFIG RESULTS GT [--model ...] [--backgrounds 0.95 0.98 0.99]
[--min-sizes 20 100 300 1000] [--fills watershed nearest] [--mws-biases 0 0.1]
[--foreground-powers 3 10] [--oracles none fn fp both fill]``

Each ``--model`` is a name (``SET:SEED``, e.g. ``medulla:0``: the part before ``:`` groups the models of
one val set), the config the model was evaluated with, the ``infer.py`` results folder holding
``val_affinities.hdf`` and ``val_membranes.hdf``, and the ground truth. For every background threshold
the voxel mutex watershed and the config's agglomeration run once; then every (minimum segment size,
fill) is post-processed and scored (VI split / merge / total in bits, ARAND), as ``infer.py`` would
segment with INFERENCE.MWS_BACKGROUND, MIN_SEGMENT_SIZE and FILL_MODE set so. Printed: one row per
setting and model, then per setting the mean VI of each set over its models, the mean of those set
means (the joint objective: each val set counts once, whatever its number of seeds), and the mean ARAND
per set; the setting with the lowest joint VI is marked.

``--mws-biases``: add each value to the voxel mutex watershed's mutex (repulsive) weights ``1 - a``
(positive: repulsion wins more often, more fragments; negative: fewer), the MWS bias of the mutex
watershed literature. Only the voxel MWS sees it; the agglomeration's region graph keeps the unbiased
weights, and its threshold stays the config's.

``--foreground-powers``: scale the voxel MWS's attractive weights by min(foreground of both voxels) ** k,
so edges through voxels the head is less sure of are drawn later (k = 0: off): INFERENCE.MWS_FOREGROUND_POWER,
each k in place of the config's. Like the bias, only the voxel MWS sees it (in every schedule).

``--oracles``: bound what a better foreground head could gain. The head's target is the ground truth
after DATASET.BOUNDARY_WIDTH / BACKGROUND_WIDTH (what training asks of it: label != 0); ``fn`` sets the
stored foreground to 1 where the target is foreground, ``fp`` to 0 where it is background, ``both`` does
both (a perfect head); ``fill`` keeps the predicted map for the watershed's mask and gives only the fill
the target's height map (the fill's share of the error). The embeddings' affinities stay as predicted.
``none`` (the default) is the model as it is.
Each model also prints the head's error rates at every background threshold: the share of target
foreground voxels below it (they cannot seed) and of target background voxels at or above it (they
can bridge two objects).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from melecole.config import load_cfg
from melecole.data.dataset import mask_boundaries
from melecole.evaluation.metrics import evaluate_segmentation
from melecole.segmentation.mws import foreground_mask, mutex_watershed, mws_weights
from melecole.segmentation.options import SegmentationOptions, build_segmentation_options
from melecole.segmentation.postprocess import fill_heightmap, postprocess_segmentation
from melecole.segmentation.volume import agglomerate_segments


def _read(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle[key][:]


def sweep_model(name: str, config: str, results: Path, gt_path: str, args: argparse.Namespace) -> list[dict]:
    """Scores of every (background, min size, fill) for one model's stored outputs."""
    cfg = load_cfg(config)
    options = build_segmentation_options(cfg, "volume")
    # The weights from the stored float16 values exactly as infer.py's and melecole-tune's reruns compute
    # them (1 - a rounded in float16): the mutex watershed's ties depend on that rounding.
    affinities = _read(results / "val_affinities.hdf", "affinities")
    foreground = _read(results / "val_membranes.hdf", "membranes")  # as stored (float16), as infer.py reads it
    gt = _read(Path(gt_path), cfg.DATASET.LABEL_KEY)
    target = mask_boundaries(gt, cfg.DATASET.BOUNDARY_WIDTH, cfg.DATASET.BACKGROUND_WIDTH) != 0
    for background in args.backgrounds:
        seeds = foreground_mask(foreground, background)  # the mask the voxel MWS gets
        print(f"{name:<12} foreground head at {background}: {np.mean(~seeds[target]):.3f} of the "
              f"target foreground below, {np.mean(seeds[~target]):.3f} of the target background "
              f"at or above", flush=True)
    weights = mws_weights(affinities, options.num_attractive)
    rows = []
    for oracle in args.oracles:
        corrected = oracle_foreground(foreground, target, oracle)
        filled_from = oracle_foreground(foreground, target, "both") if oracle == "fill" else corrected
        heightmaps = {fill: fill_heightmap(filled_from, fill) for fill in args.fills}
        for variant, variant_weights, power in mws_variants(weights, options, args):
            for background in args.backgrounds:
                labels = mutex_watershed(
                    variant_weights, options.offsets, foreground=corrected, background_threshold=background,
                    strides=options.strides, weights_ready=True, foreground_power=power,
                )
                if options.agglomeration != "none":
                    labels = agglomerate_segments(labels, weights, dataclasses.replace(options, background=background))
                rows += score_labels(name, labels, heightmaps, gt, (oracle, variant, background), args)
    return rows


def mws_variants(
    weights: np.ndarray, options: SegmentationOptions, args: argparse.Namespace
) -> Iterator[tuple[str, np.ndarray, float]]:
    """(name, weights, foreground power) of the voxel MWS per ``--mws-biases`` value (bias ``b``: mutex
    weights + b, at the config's INFERENCE.MWS_FOREGROUND_POWER) and per ``--foreground-powers`` value
    (``fg^k``: the power k in place of the config's; 0 adds nothing); ``"0"`` = the voxel MWS as ``infer.py``
    runs it. The power is applied by :func:`mutex_watershed`, as in every schedule."""
    for bias in args.mws_biases:
        if not bias:
            yield "0", weights, options.foreground_power
            continue
        biased = weights.copy()
        biased[options.num_attractive:] += np.float32(bias)
        yield f"{bias:+g}", biased, options.foreground_power
    for power in args.foreground_powers:
        if power:
            yield f"fg^{power:g}", weights, power


def oracle_foreground(foreground: np.ndarray, target: np.ndarray, oracle: str) -> np.ndarray:
    """``foreground`` with the head's errors against ``target`` removed: ``fn`` (target foreground -> 1),
    ``fp`` (target background -> 0), ``both``; ``none`` and ``fill`` (only the fill's height map is the
    oracle's, see :func:`sweep_model`) return it unchanged."""
    if oracle in ("none", "fill"):
        return foreground
    corrected = foreground.copy()
    if oracle in ("fn", "both"):
        corrected[target] = 1
    if oracle in ("fp", "both"):
        corrected[~target] = 0
    return corrected


def score_labels(name: str, labels: np.ndarray, heightmaps: dict, gt: np.ndarray, setting: tuple,
                 args: argparse.Namespace) -> list[dict]:
    """Rows of every (min size, fill) post-processing of one watershed result; ``heightmaps`` per fill mode,
    ``setting`` = (oracle, MWS weights, background)."""
    rows = []
    for min_size in args.min_sizes:
        for fill in args.fills:
            segmentation = postprocess_segmentation(
                labels, min_size=min_size, fill=True, heightmap=heightmaps[fill]
            )
            scores = evaluate_segmentation(segmentation, gt, top_k=0)
            row = {"model": name, "oracle": setting[0], "weights": setting[1], "background": setting[2],
                   "min_size": min_size, "fill": fill,
                   "split": scores.vi_split, "merge": scores.vi_merge, "vi": scores.vi_total, "arand": scores.arand}
            print(f"{name:<12} {setting[0]:>6} {setting[1]:>7} {setting[2]:>6} {min_size:>6} {fill:<10} "
                  f"{row['split']:8.4f} {row['merge']:8.4f} {row['vi']:8.4f} {row['arand']:7.4f}", flush=True)
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> None:
    """Per setting: mean VI per set, the joint mean of set means, mean ARAND per set."""
    by_setting: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        setting = (row["oracle"], row["fill"], row["weights"], row["background"], row["min_size"])
        by_setting[setting][row["model"].split(":")[0]].append(row)
    sets = sorted({row["model"].split(":")[0] for row in rows})
    joint = {}
    for setting, per_set in by_setting.items():
        joint[setting] = statistics.mean(statistics.mean(r["vi"] for r in per_set[s]) for s in sets)
    real = [setting for setting in joint if setting[0] == "none"] or list(joint)  # an oracle is a bound, not a choice
    best = min(real, key=joint.get)
    print(f"\n| oracle | fill | MWS weights | background | min size | "
          f"{' | '.join(f'{s} VI (mean, n)' for s in sets)} | joint VI | {' | '.join(f'{s} ARAND' for s in sets)} |")
    print("|---|---|---:|---:|---:|" + "---:|" * (2 * len(sets) + 1))
    for setting in sorted(by_setting):
        per_set = by_setting[setting]
        vis = [f"{statistics.mean(r['vi'] for r in per_set[s]):.3f} ({len(per_set[s])})" for s in sets]
        arands = [f"{statistics.mean(r['arand'] for r in per_set[s]):.3f}" for s in sets]
        mark = " **best**" if setting == best else ""
        print(f"| {' | '.join(str(v) for v in setting)} | {' | '.join(vis)} | {joint[setting]:.3f}{mark} | "
              f"{' | '.join(arands)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs=4, action="append", required=True, metavar=("NAME", "CONFIG", "RESULTS", "GT"))
    parser.add_argument("--backgrounds", nargs="+", type=float, default=[0.95, 0.98, 0.99])
    parser.add_argument("--min-sizes", nargs="+", type=int, default=[20, 100, 300, 1000])
    parser.add_argument("--fills", nargs="+", default=["watershed", "nearest"])
    parser.add_argument("--mws-biases", nargs="+", type=float, default=[0.0])
    parser.add_argument("--foreground-powers", nargs="+", type=float, default=[])
    parser.add_argument("--oracles", nargs="+", choices=["none", "fn", "fp", "both", "fill"], default=["none"])
    args = parser.parse_args()
    print(f"{'model':<12} {'oracle':>6} {'weights':>7} {'bg':>6} {'min':>6} {'fill':<10} {'split':>8} {'merge':>8} "
          f"{'VI':>8} {'ARAND':>7}")
    rows = []
    for name, config, results, gt in args.model:
        rows += sweep_model(name, config, Path(results), gt, args)
    summary(rows)


if __name__ == "__main__":
    main()
