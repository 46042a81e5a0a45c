"""Weight averaging of a run's last snapshots (stochastic weight averaging at no training cost).

Run: ``python bench/bench_average.py --run NAME CONFIG RUN_DIR GT [--run ...] [--last 1 2 3 4]``

Each ``--run`` is a name (``SET:SEED``; the part before ``:`` groups one val set's runs), the config the
run trained with, its run folder (``checkpoints/iter_*.pt`` every LOG.CHECKPOINT_FREQUENCY iterations)
and the val ground truth. For each ``--last K`` the parameters of the run's last K snapshots are
averaged (equal weights; the models use group norm, so no statistics need recomputing) into a
temporary checkpoint, which ``infer.py --split val`` segments with the config's shipped inference and
scores. ``K = 1`` is the final model as trained. Printed: one row per (run, K), then per K the mean
(spread) VI per set and the joint mean of the set means. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from melecole.engine.checkpoint import load_checkpoint
from melecole.utils.files import atomic_torch_save

SCORE = re.compile(r"segmentation: VI split ([\d.]+) merge ([\d.]+) ARAND ([\d.]+)")


def snapshots(run_dir: Path) -> list[Path]:
    """The run's ``iter_N.pt`` snapshots in iteration order."""
    found = sorted((run_dir / "checkpoints").glob("iter_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise SystemExit(f"error: run folder '{run_dir}' has no checkpoints/iter_*.pt")
    return found


def averaged(paths: list[Path], out: Path) -> None:
    """Writes the checkpoint of the last path with every floating-point parameter averaged over ``paths``."""
    checkpoints = [load_checkpoint(p) for p in paths]
    last = checkpoints[-1]
    state = {}
    for key, value in last["model"].items():
        if value.is_floating_point():
            state[key] = torch.stack([c["model"][key].double() for c in checkpoints]).mean(0).to(value.dtype)
        else:
            state[key] = value
    kept = {key: value for key, value in last.items() if key not in ("path", "optimizer", "scheduler", "scaler", "rng")}
    atomic_torch_save({**kept, "model": state}, out)


def score(config: str, checkpoint: Path, folder: Path, gt: str) -> tuple[float, float, float]:
    """(VI split, VI merge, ARAND) of ``infer.py --split val`` with ``checkpoint``."""
    command = [sys.executable, "infer.py", "--split", "val", "--config", config, "--checkpoint", str(checkpoint),
               "--output-dir", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    match = SCORE.search(result.stdout + result.stderr)
    if result.returncode or not match:
        raise SystemExit(f"error: infer.py failed for '{checkpoint}':\n{result.stderr[-2000:]}")
    return tuple(float(v) for v in match.groups())  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=4, action="append", required=True, metavar=("NAME", "CONFIG", "RUN_DIR", "GT"))
    parser.add_argument("--last", nargs="+", type=int, default=[1, 2, 3, 4])
    args = parser.parse_args()
    rows: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    print(f"{'run':<12} {'K':>2} {'snapshots':<28} {'split':>7} {'merge':>7} {'VI':>7} {'ARAND':>7}")
    with tempfile.TemporaryDirectory() as temporary:
        for name, config, run_dir, gt in args.run:
            available = snapshots(Path(run_dir))
            for k in args.last:
                chosen = available[-k:]
                folder = Path(temporary) / f"{name.replace(':', '-')}-{k}"
                folder.mkdir()
                averaged(chosen, folder / "averaged.pt")
                split, merge, arand = score(config, folder / "averaged.pt", folder / "infer", gt)
                rows[k][name.split(":")[0]].append(split + merge)
                label = ",".join(p.stem.removeprefix("iter_") for p in chosen)
                print(f"{name:<12} {k:>2} {label:<28} {split:7.4f} {merge:7.4f} {split + merge:7.4f} {arand:7.4f}",
                      flush=True)
    sets = sorted({name.split(":")[0] for name, *_ in args.run})
    print(f"\n| last K | {' | '.join(f'{s} VI mean (spread)' for s in sets)} | joint VI |")
    print("|---:|" + "---|" * len(sets) + "---:|")
    for k in args.last:
        cells = [f"{statistics.mean(rows[k][s]):.3f} ({min(rows[k][s]):.3f}-{max(rows[k][s]):.3f})" for s in sets]
        joint = statistics.mean(statistics.mean(rows[k][s]) for s in sets)
        print(f"| {k} | {' | '.join(cells)} | {joint:.3f} |")


if __name__ == "__main__":
    main()
