"""Fault injection (not run in CI): kill infer.py and train.py at random moments and check what is left.

    python bench/fault_injection.py --infer-runs 50 --train-runs 50 --seed 0

infer.py: a tiny split of two labelled volumes, and two configs whose predictions differ
(INFERENCE.BLENDING), so a killed run can leave files of both on disk. Each trial starts infer.py with
one of them (seeded choice, with --overwrite so that it always predicts and writes) into one shared
results folder, sends SIGKILL after a random fraction of a full run (--infer-window; 0.6 1.05 aims
at the writes at the end), then checks:
  - load:  every result file left there opens and its datasets read (or is absent);
  - mix:   files of one volume whose fingerprints differ are refused by the readers (evaluation and
           view.py's check); a mix that a reader accepts is a failure;
  - rerun: infer.py with the same config completes, gives exactly the reference segmentation of that
           config, and leaves no temporary file.
train.py: a tiny 12-iteration run per trial, SIGKILL or SIGTERM (alternating) at a random moment, then:
  - load:  checkpoints/last.pt (if any) loads;
  - resume: `train.py --resume RUN` completes and its final weights equal the uninterrupted run's
           bit for bit; no temporary file is left in checkpoints/.
A table of counts is printed at the end (target: 0 failures).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from melecole.testing import box_volume

REPO = Path(__file__).resolve().parents[1]
KINDS = ("affinities", "membranes", "segmentation")
TINY = {
    "MODEL.INPUT_SIZE": "[8, 32, 32]",
    "MODEL.FILTERS": "[4, 8]",
    "MODEL.POOL_Z": "[False]",
    "MODEL.NORM_GROUPS": "2",
    "MODEL.EMBEDDING_DIMENSION": "4",
    "HARDWARE.DEVICE": "cpu",
    "HARDWARE.NUM_WORKERS": "0",
    "HARDWARE.NUM_THREADS": "1",
    "LOG.PROGRESS_BAR": "False",
}
TRAIN = {
    "OPTIM.TOTAL_ITER": "12",
    "OPTIM.BATCH_SIZE": "2",
    "LOG.CHECKPOINT_FREQUENCY": "2",
    "LOG.VAL_FREQUENCY": "6",
    "LOG.VAL_PATCHES": "2",
    "LOG.IMAGE_FREQUENCY": "100",
    "LOG.LOG_FREQUENCY": "1",
    "AUGMENTATION.ELASTIC.P": "0.0",
}


def _pairs(options: dict[str, str]) -> list[str]:
    return [item for pair in options.items() for item in pair]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=timeout
    )


def _box_volume(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    """A tiny labelled HDF5 volume (:func:`melecole.testing.box_volume`)."""
    raw, labels = box_volume(shape, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["volume"], handle["labels"] = raw, labels


def _kill_at(args: list[str], delay: float, sig: int) -> tuple[int, bool]:
    """Starts ``python args``, sends ``sig`` after ``delay`` s; (exit code, whether it was still running)."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        process.wait(timeout=delay)
        return process.returncode, False
    except subprocess.TimeoutExpired:
        process.send_signal(sig)
        return process.wait(timeout=300), True


# ------------------------------------------------------------------------------------------- infer


def _infer_setup(work: Path) -> dict:
    import torch

    from melecole.config import load_cfg
    from melecole.engine.checkpoint import save_checkpoint
    from melecole.models import build_model

    data = work / "data"
    for index, shape in enumerate(((16, 64, 64), (12, 48, 56))):
        _box_volume(data / "val" / f"vol{index}.hdf", shape, seed=index)
    cfg = load_cfg(None, _pairs({**TINY, "DATASET.DATA_ROOT": str(data)}))
    config = work / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = work / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=5)
    variants = {"A": [], "B": ["INFERENCE.BLENDING", "constant"]}
    return {"config": config, "checkpoint": checkpoint, "data": data, "variants": variants}


def _infer_args(setup: dict, variant: str, output_dir: Path) -> list[str]:
    return [
        "infer.py", "--split", "val", "--no-eval", "--config", str(setup["config"]),
        "--checkpoint", str(setup["checkpoint"]), "--output-dir", str(output_dir), *setup["variants"][variant],
    ]  # fmt: skip


def _segmentations(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted(folder.glob("*_segmentation.hdf")):
        with h5py.File(path, "r") as handle:
            arrays[path.name] = handle["segmentation"][()]
    return arrays


def _check_left_files(folder: Path, data: Path) -> Counter:
    """Loads every result file; for each volume, a fingerprint mix must be refused by the readers."""
    from melecole.errors import DataError
    from melecole.evaluation.report import evaluate_files
    from melecole.io import check_same_fingerprint

    outcome: Counter = Counter()
    for path in sorted(folder.glob("*.hdf")):
        try:
            with h5py.File(path, "r") as handle:
                for key in handle:
                    handle[key][()]
        except Exception:  # noqa: BLE001 - any failure to read is what we count
            outcome["FAIL unloadable file"] += 1
    for index in range(2):
        paths = {kind: folder / f"val_vol{index}_{kind}.hdf" for kind in KINDS}
        present = {kind: path for kind, path in paths.items() if path.is_file()}
        fingerprints = set()
        for path in present.values():
            with h5py.File(path, "r") as handle:
                fingerprints.add(handle.attrs.get("fingerprint"))
        if len(fingerprints) <= 1:
            continue
        outcome["mixed files on disk"] += 1
        roles = {f"--{kind}": present.get(kind) for kind in KINDS}
        try:
            check_same_fingerprint(roles)
            outcome["FAIL view.py accepts a mix"] += 1
        except DataError:
            outcome["view.py refused the mix"] += 1
        if "segmentation" in present and "membranes" in present:
            try:
                gt, histogram = data / "val" / f"vol{index}.hdf", folder.parent / "histogram.png"
                evaluate_files(gt, paths["segmentation"], membranes_path=paths["membranes"], histogram_path=histogram)
                outcome["FAIL evaluation accepts a mix"] += 1
            except DataError:
                outcome["evaluation refused the mix"] += 1
    return outcome


def infer_trials(work: Path, runs: int, rng: np.random.Generator, window: tuple[float, float]) -> Counter:
    setup = _infer_setup(work)
    references, seconds = {}, {}
    for variant in setup["variants"]:
        start = time.perf_counter()
        result = _run(_infer_args(setup, variant, work / f"reference_{variant}"))
        seconds[variant] = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"reference infer.py run failed:\n{result.stderr[-3000:]}")
        references[variant] = _segmentations(work / f"reference_{variant}" / "results" / "last")
    print(f"infer.py full run: {', '.join(f'{v} {s:.1f} s' for v, s in seconds.items())}", flush=True)
    outcome: Counter = Counter()
    shared = work / "shared"
    folder = shared / "results" / "last"
    for trial in range(runs):
        variant = str(rng.choice(list(setup["variants"])))
        delay = float(rng.uniform(window[0] * seconds[variant], window[1] * seconds[variant]))
        # --overwrite: the killed run always predicts and writes (a cached variant would finish at once)
        _, killed = _kill_at([*_infer_args(setup, variant, shared), "--overwrite"], delay, signal.SIGKILL)
        outcome["killed" if killed else "finished before the kill"] += 1
        if folder.is_dir() and [p for p in folder.iterdir() if p.name.startswith(".")]:
            outcome["killed during a write (temporary file left)"] += 1
        outcome.update(_check_left_files(folder, setup["data"]))
        rerun = _run(_infer_args(setup, variant, shared))
        if rerun.returncode != 0:
            outcome["FAIL rerun exit code"] += 1
            print(f"trial {trial}: rerun failed: {rerun.stderr[-500:]}", flush=True)
            continue
        same = _segmentations(folder)
        if same.keys() != references[variant].keys() or any(
            not np.array_equal(same[name], references[variant][name]) for name in same
        ):
            outcome["FAIL rerun differs from the reference"] += 1
        if [p for p in folder.iterdir() if p.name.startswith(".")]:
            outcome["FAIL temporary left after the rerun"] += 1
        print(f"infer trial {trial + 1}/{runs}: {variant} killed at {delay:.1f} s", flush=True)
    return outcome


# ------------------------------------------------------------------------------------------- train


def _train_args(config: Path, output: Path) -> list[str]:
    return ["melecole/train.py", "--config", str(config), "LOG.OUTPUT_PATH", str(output)]


def _final_weights(output: Path) -> dict | None:
    import torch

    runs = sorted(p for p in output.iterdir() if (p / "checkpoints" / "last.pt").is_file()) if output.exists() else []
    if not runs:
        return None
    checkpoint = torch.load(runs[-1] / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return {"iteration": checkpoint.get("iteration"), "model": checkpoint["model"]}


def _same_weights(first: dict, second: dict) -> bool:
    import torch

    return first["model"].keys() == second["model"].keys() and all(
        torch.equal(first["model"][key], second["model"][key]) for key in first["model"]
    )


def _resume_trial(output: Path, reference: dict) -> Counter:
    """After a kill: last.pt loads, --resume completes bit-exactly, no temporary is left."""
    import torch

    outcome: Counter = Counter()
    runs = sorted(p for p in output.iterdir() if p.is_dir()) if output.exists() else []
    last = runs[-1] / "checkpoints" / "last.pt" if runs else None
    if last is None or not last.is_file():
        outcome["no last.pt yet (killed before the first checkpoint)"] += 1
        return outcome
    try:
        torch.load(last, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001
        outcome["FAIL last.pt does not load"] += 1
        return outcome
    resumed = _run(["melecole/train.py", "--resume", str(runs[-1])])
    if resumed.returncode != 0:
        outcome["FAIL --resume exit code"] += 1
        print(f"resume failed: {resumed.stderr[-500:]}", flush=True)
        return outcome
    final = _final_weights(output)
    if final is None or final["iteration"] != reference["iteration"] or not _same_weights(final, reference):
        outcome["FAIL resumed weights differ"] += 1
    else:
        outcome["resumed bit-exactly"] += 1
    if [p for p in (runs[-1] / "checkpoints").iterdir() if p.name.startswith(".")]:
        outcome["FAIL temporary left in checkpoints/"] += 1
    return outcome


def train_trials(work: Path, runs: int, rng: np.random.Generator) -> Counter:
    from melecole.config import load_cfg

    data = work / "train_data"
    for split, seed in (("train", 0), ("val", 1)):
        _box_volume(data / split / f"{split}.hdf", (12, 40, 40), seed)
    config = work / "train.yaml"
    config.write_text(load_cfg(None, _pairs({**TINY, **TRAIN, "DATASET.DATA_ROOT": str(data)})).dump())
    start = time.perf_counter()
    result = _run(_train_args(config, work / "train_reference"))
    seconds = time.perf_counter() - start
    reference = _final_weights(work / "train_reference")
    if result.returncode != 0 or reference is None:
        raise SystemExit(f"reference training run failed:\n{result.stderr[-3000:]}")
    print(f"train.py full run: {seconds:.1f} s", flush=True)
    outcome: Counter = Counter()
    for trial in range(runs):
        sig = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        name = "SIGKILL" if sig == signal.SIGKILL else "SIGTERM"
        output = work / f"train_{trial:03d}"
        delay = float(rng.uniform(0.5, seconds))
        code, killed = _kill_at(_train_args(config, output), delay, sig)
        if not killed:
            outcome[f"{name}: finished before the signal"] += 1
        else:
            outcome[f"{name}: exit code {code}"] += 1
        checked = _resume_trial(output, reference)
        outcome.update(Counter({f"{name}: {key}": value for key, value in checked.items()}))
        print(f"train trial {trial + 1}/{runs}: {name} at {delay:.1f} s (exit {code})", flush=True)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer-runs", type=int, default=50)
    parser.add_argument("--train-runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--infer-window",
        type=float,
        nargs=2,
        default=(0.03, 1.1),
        metavar=("LOW", "HIGH"),
        help="infer.py kill moment: uniform in [LOW, HIGH] x the duration of a full run",
    )
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="melecole-faults-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tables = {}
        if args.infer_runs:
            window = tuple(args.infer_window)
            name = f"infer.py (SIGKILL {window[0]:g}-{window[1]:g} T)"
            tables[name] = infer_trials(work, args.infer_runs, rng, window)
        if args.train_runs:
            tables["train.py (SIGKILL / SIGTERM)"] = train_trials(work, args.train_runs, rng)
    failures = 0
    print(f"\nfault injection, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    print(f"{'target':<34}{'outcome':<62}{'count':>6}")
    print("-" * 102)
    for target, outcome in tables.items():
        for key, count in sorted(outcome.items()):
            print(f"{target:<34}{key:<62}{count:>6}")
            failures += count if key.startswith("FAIL") or ": FAIL" in key else 0
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
