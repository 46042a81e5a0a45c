"""Fault injection (not run in CI): kill infer.py, train.py and the blockwise driver or its workers at random
moments and check what is left.

    python bench/fault_injection.py --infer-runs 50 --train-runs 50 --blockwise-runs 30 --sigterm-runs 20 --seed 0

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
train.py, --sigterm-runs: SIGTERM at a random moment after the first checkpoint (checkpoints/last.pt
exists), then:
  - exit:   the run leaves like Ctrl-C: exit code 130, no traceback on stderr, and last.pt holds the
           iteration it reported ("interrupted at iteration N");
  - resume: as above (bit-exact final weights, no temporary left).
  With --sigterm-group the signal goes to the run's whole process group (what SLURM's scancel and
  `kill -- -PGID` do) and the runs load with one DataLoader worker, which gets it too.
python -m melecole.blockwise, --blockwise-runs: one uninterrupted reference run on a tiny Voronoi volume
(--blockwise-shape, --blockwise-block: >= 12 blocks, 2 workers), then per trial a seeded choice of kill
kind and pass (fragments, graph, agglomerate, relabel; each combination equally often). The trial waits
until that pass has a random number k of its n blocks marked done (the markers in
<parent>/.<name>.blockwise/done/<pass>/; k = 0: the pass began, k = n: the pass ended, which for relabel
is the commit), plus 0-50 ms, then sends SIGKILL to
  - the driver (its LocalCluster's workers must end with it), then runs the same command with --resume;
  - or one dask worker process (a child of the driver): dask reruns its task, the run finishes by itself.
Checks: every run exits 0 (but the killed driver), the labels equal the reference's (np.array_equal),
the output's folder holds only the output (no work folder, no .*.tmp* / .*.old-* anywhere), and no
process of the runs is left running 30 s after the end (leftovers are killed and counted as failures).
A table of counts is printed at the end (target: 0 failures): "ok: CHECK" / "FAIL: CHECK" count
passed and failed checks, other rows what happened.

Fault injection as measured for bench/RESULTS.md (30 blockwise + 20 SIGTERM trials):

    python bench/fault_injection.py --infer-runs 0 --train-runs 0 --blockwise-runs 30 --sigterm-runs 20 --seed 0
    python bench/fault_injection.py --infer-runs 0 --train-runs 0 --blockwise-runs 0 --sigterm-runs 20 \
        --sigterm-group --seed 0
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
from typing import Callable

import h5py
import numpy as np
import psutil

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


FINAL_CHECKPOINT = "(final)"  # the trainer's log line of the final checkpoint ends so


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


def _check(outcome: Counter, check: str, passed: bool) -> bool:
    """Counts one check as "ok: CHECK" or "FAIL: CHECK"; returns ``passed``."""
    outcome[f"{'ok' if passed else 'FAIL'}: {check}"] += 1
    return passed


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Watched:
    """``python args`` started in a session of its own (stdout / stderr into ``log``.out / .err), with
    every descendant process seen while it ran (:meth:`refresh`), so that orphans are found later."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, env=_environment(), stdout=out, stderr=err, start_new_session=True
            )
        self.root = psutil.Process(self.popen.pid)
        self.seen: dict[int, psutil.Process] = {}
        self.last_refresh = 0.0

    def refresh(self, every: float = 0.1) -> None:
        """Records the current descendants (at most once per ``every`` s)."""
        if time.monotonic() - self.last_refresh < every:
            return
        self.last_refresh = time.monotonic()
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def workers(self) -> list[psutil.Process]:
        """The driver's dask worker processes (multiprocessing spawn children; not the resource tracker)."""
        try:
            children = self.root.children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 600) -> int | None:
        """The exit code (None: still running after ``timeout`` s, then killed)."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            self.refresh()
            time.sleep(0.02)
        if self.running():
            self.popen.kill()
            self.popen.wait()
            return None
        return self.popen.returncode

    def leftovers(self, grace: float = 30.0) -> list[str]:
        """Descendants still running ``grace`` s after the end (they are killed, by pid)."""
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in self.seen.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = []
        for process in self.seen.values():
            if _alive(process):
                try:
                    left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
                    process.kill()
                except psutil.Error:
                    continue
        return left

    def output(self) -> str:
        return Path(f"{self.log}.out").read_text() + Path(f"{self.log}.err").read_text()

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()


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


def _last_checkpoint(output: Path) -> Path | None:
    found = sorted(output.glob("*/checkpoints/last.pt"))
    return found[-1] if found else None


def _train_setup(work: Path) -> dict:
    """Tiny data and config; the uninterrupted reference run (its duration and first checkpoint's time)."""
    from melecole.config import load_cfg

    data = work / "train_data"
    for split, seed in (("train", 0), ("val", 1)):
        _box_volume(data / split / f"{split}.hdf", (12, 40, 40), seed)
    config = work / "train.yaml"
    config.write_text(load_cfg(None, _pairs({**TINY, **TRAIN, "DATASET.DATA_ROOT": str(data)})).dump())
    start = time.perf_counter()
    watched = Watched(_train_args(config, work / "train_reference"), work / "train_reference")
    first = final = None
    while watched.running():
        if first is None and _last_checkpoint(work / "train_reference") is not None:
            first = time.perf_counter() - start
        if final is None and FINAL_CHECKPOINT in watched.output():
            final = time.perf_counter() - start
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    reference = _final_weights(work / "train_reference")
    if watched.wait() != 0 or reference is None or first is None or final is None:
        raise SystemExit(f"reference training run failed:\n{watched.output()[-3000:]}")
    print(f"train.py full run: {seconds:.1f} s, first checkpoint after {first:.1f} s, final after {final:.1f} s")
    return {"config": config, "reference": reference, "seconds": seconds, "first_checkpoint": first, "final": final}


def train_trials(work: Path, setup: dict, runs: int, rng: np.random.Generator) -> Counter:
    """SIGKILL or SIGTERM (alternating) at a random moment of a run, then --resume."""
    outcome: Counter = Counter()
    for trial in range(runs):
        sig = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        name = "SIGKILL" if sig == signal.SIGKILL else "SIGTERM"
        output = work / f"train_{trial:03d}"
        delay = float(rng.uniform(0.5, setup["seconds"]))
        code, killed = _kill_at(_train_args(setup["config"], output), delay, sig)
        if not killed:
            outcome[f"{name}: finished before the signal"] += 1
        else:
            outcome[f"{name}: exit code {code}"] += 1
        checked = _resume_trial(output, setup["reference"])
        outcome.update(Counter({f"{name}: {key}": value for key, value in checked.items()}))
        print(f"train trial {trial + 1}/{runs}: {name} at {delay:.1f} s (exit {code})", flush=True)
    return outcome


def _sigterm_after_checkpoint(watched: Watched, output: Path, delay: float, group: bool = False) -> str:
    """Sends SIGTERM ``delay`` s after checkpoints/last.pt appeared (to the run's process group with
    ``group``); when it came: "training", "exiting" (the final checkpoint was logged already) or
    "never" (the run ended first)."""
    while watched.running() and _last_checkpoint(output) is None:
        watched.refresh()
        time.sleep(0.01)
    deadline = time.monotonic() + delay
    while watched.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not watched.running():
        return "never"
    watched.refresh(every=0)
    moment = "exiting" if FINAL_CHECKPOINT in watched.output() else "training"
    if group:
        os.killpg(watched.popen.pid, signal.SIGTERM)
    else:
        watched.popen.send_signal(signal.SIGTERM)
    return moment


def _check_clean_exit(outcome: Counter, watched: Watched, code: int | None, output: Path) -> None:
    """After SIGTERM during training: exit 130, no traceback, last.pt at the iteration the run reported
    (when the trainer's loop reported one), no process left."""
    import re

    import torch

    _check(outcome, "exit code 130", code == 130)
    _check(outcome, "no traceback on stderr", "Traceback" not in watched.stderr())
    reported = re.findall(r"interrupted at iteration (\d+)", watched.output())
    last = _last_checkpoint(output)
    saved = torch.load(last, map_location="cpu", weights_only=False)["iteration"] if last else None
    if reported:
        _check(outcome, "last.pt holds the interrupted iteration", saved == int(reported[-1]))
    else:
        outcome["SIGTERM outside the loop (no 'interrupted at iteration' line)"] += 1
    _check(outcome, "no process left", not watched.leftovers(grace=10))
    if code != 130 or "Traceback" in watched.stderr():
        print(f"  exit {code}, stderr: {watched.stderr()[-1500:]}", flush=True)


def sigterm_trials(work: Path, setup: dict, runs: int, rng: np.random.Generator, group: bool = False) -> Counter:
    """SIGTERM at a random moment after the first checkpoint, then --resume (bit-exact weights); with
    ``group`` to the whole process group, one DataLoader worker loading."""
    outcome: Counter = Counter()
    window = max(setup["final"] - setup["first_checkpoint"], 0.2)
    for trial in range(runs):
        output = work / f"sigterm_{trial:03d}"
        delay = float(rng.uniform(0, window))
        extra = ["HARDWARE.NUM_WORKERS", "1"] if group else []
        watched = Watched(_train_args(setup["config"], output) + extra, work / f"sigterm_{trial:03d}")
        moment = _sigterm_after_checkpoint(watched, output, delay, group)
        code = watched.wait()
        if moment == "never":
            outcome["finished before the signal"] += 1
        elif moment == "exiting":  # after the final checkpoint's line: the process was on its way out
            outcome[f"SIGTERM after the final checkpoint: exit code {code}"] += 1
            _check(outcome, "no process left", not watched.leftovers(grace=10))
        else:
            outcome["SIGTERM during training (after the first checkpoint)"] += 1
            _check_clean_exit(outcome, watched, code, output)
        outcome.update(_resume_trial(output, setup["reference"]))
        iteration = (_final_weights(output) or {}).get("iteration")
        print(
            f"sigterm trial {trial + 1}/{runs}: SIGTERM {delay:.2f} s after last.pt ({moment}, exit {code}), "
            f"final iteration {iteration}",
            flush=True,
        )
    return outcome


# --------------------------------------------------------------------------------------- blockwise

BLOCKWISE_PASSES = ("fragments", "graph", "agglomerate", "relabel")
BLOCKWISE_CONFIG = REPO / "configs" / "synthetic-UNet3D.yaml"


def _voronoi_affinities(shape: tuple[int, int, int], offsets: list, seed: int = 0) -> np.ndarray:
    """float32 (C, Z, Y, X): affinities of Voronoi cells (z anisotropy 4, one per 2000 voxels), blurred
    and with Gaussian noise (std 0.15), clipped to [0, 1] (as tests/blockwise/conftest.py)."""
    from scipy import ndimage

    from melecole.inference.affinities import affinities_from_labels

    rng = np.random.default_rng(seed)
    cells = max(8, int(np.prod(shape)) // 2000)
    markers = np.zeros(shape, dtype=np.int32)
    markers[tuple(rng.integers(0, shape, size=(cells, 3)).T)] = np.arange(1, cells + 1)
    _, index = ndimage.distance_transform_edt(markers == 0, sampling=(4, 1, 1), return_indices=True)
    ideal = affinities_from_labels(markers[tuple(index)], offsets)
    blurred = ndimage.gaussian_filter(ideal, (0, 0.5, 1.0, 1.0))
    return np.clip(blurred + rng.normal(0, 0.15, ideal.shape), 0, 1).astype(np.float32)


def _blockwise_setup(work: Path, shape: tuple[int, int, int], block: tuple[int, int, int]) -> dict:
    from melecole.blockwise.plan import BlockPlan
    from melecole.config import load_cfg

    overrides = {
        "BLOCKWISE.OUTPUT_CHUNKS": str([8, 16, 16]),
        "BLOCKWISE.BLOCK_SHAPE": str(list(block)),
        "INFERENCE.MIN_SEGMENT_SIZE": "10",
        "LOG.PROGRESS_BAR": "False",
    }
    cfg = load_cfg(str(BLOCKWISE_CONFIG), _pairs(overrides))
    folder = work / "blockwise"
    folder.mkdir(parents=True, exist_ok=True)
    affinities = folder / "affinities.hdf"
    with h5py.File(affinities, "w") as handle:
        handle["affinities"] = _voronoi_affinities(shape, cfg.INFERENCE.OFFSETS)
    blocks = BlockPlan(shape, tuple(block)).num_blocks
    args = [
        "-m", "melecole.blockwise", "--affinities", f"{affinities}:affinities", "--config", str(BLOCKWISE_CONFIG),
        "--workers", "2",
    ]  # fmt: skip
    passes = {name: 1 if name == "agglomerate" else blocks for name in BLOCKWISE_PASSES}
    return {"folder": folder, "args": args, "opts": _pairs(overrides), "passes": passes}


def _blockwise_args(setup: dict, output: Path, resume: bool = False) -> list[str]:
    return [*setup["args"], "--output", str(output), *(["--resume"] if resume else []), *setup["opts"]]


def _markers(workdir: Path, name: str) -> int:
    """Blocks of pass ``name`` marked done (temporary marker files start with a dot)."""
    try:
        return sum(1 for entry in os.listdir(workdir / "done" / name) if not entry.startswith("."))
    except FileNotFoundError:
        return 0


def _moment(workdir: Path, passes: dict[str, int]) -> str:
    """Where a run is, from its markers: the first pass not complete, or the commit after the last one."""
    if not workdir.is_dir():
        return "after the commit"
    for name, total in passes.items():
        if _markers(workdir, name) < total:
            return name
    return "commit"


def _wait_for_moment(watched: Watched, workdir: Path, passes: dict[str, int], name: str, target: int) -> bool:
    """Waits until pass ``name`` began (the previous pass is complete) and has ``target`` blocks marked
    done; False when the run ended first."""
    names = list(passes)
    previous = names[names.index(name) - 1] if names.index(name) else None
    while watched.running():
        watched.refresh()
        if previous is None:
            began = (workdir / "done" / name).is_dir()
        else:
            began = _markers(workdir, previous) >= passes[previous]
        if began and _markers(workdir, name) >= target:
            return True
        time.sleep(0.002)
    return False


def _left_in(folder: Path, output: Path) -> list[str]:
    """What a finished run must not leave: anything beside the output, temporaries anywhere below."""
    left = [entry.name for entry in folder.iterdir() if entry != output and not entry.name.endswith((".out", ".err"))]
    for root, directories, files in os.walk(folder):
        for entry in directories + files:
            if entry.startswith(".") and (".tmp" in entry or ".old-" in entry):
                left.append(str(Path(root, entry).relative_to(folder)))
    return sorted(set(left))


def _read_labels(output: Path) -> np.ndarray | None:
    import zarr

    try:
        return np.asarray(zarr.open_array(str(output), mode="r")[...])
    except Exception:  # noqa: BLE001 - a missing or unreadable output is what we count
        return None


def _kill(watched: Watched, kind: str, choice: float) -> str:
    """SIGKILL to the driver or to one of its workers (``choice`` in [0, 1) picks it); what was killed."""
    watched.refresh(every=0)
    if kind == "driver":
        os.kill(watched.popen.pid, signal.SIGKILL)
        return "driver"
    workers = watched.workers()
    if not workers:
        return "no worker (cluster closed)"
    worker = workers[int(choice * len(workers))]
    try:
        worker.kill()
    except psutil.Error:
        return "no worker (it had ended)"
    return "worker"


def _blockwise_trial(setup: dict, folder: Path, kind: str, name: str, target: int, rng: np.random.Generator) -> tuple:
    """One killed run (and its --resume after a driver kill); (outcome, description, exit codes)."""
    folder.mkdir(parents=True)
    output, outcome = folder / "seg.zarr", Counter()
    workdir = folder / f".{output.name}.blockwise"
    jitter, choice = float(rng.uniform(0, 0.05)), float(rng.uniform())
    watched = Watched(_blockwise_args(setup, output), folder / "run")
    killed = moment = "nothing (finished first)"
    if _wait_for_moment(watched, workdir, setup["passes"], name, target):
        time.sleep(jitter)
        if watched.running():
            moment = _moment(workdir, setup["passes"])
            killed = _kill(watched, kind, choice)
    outcome[f"{kind} kill at {name}: killed {killed} during {moment}"] += 1
    codes = [watched.wait()]
    runs = [watched]
    if kind == "driver" and killed == "driver":
        left = watched.leftovers()
        _check(outcome, "no process left 30 s after the driver kill", not left)
        stale = (workdir / "lock").exists()
        resumed = Watched(_blockwise_args(setup, output, resume=True), folder / "resume")
        codes.append(resumed.wait())
        runs.append(resumed)
        _check(outcome, "--resume exits 0", codes[-1] == 0)
        if stale:  # the killed driver's lock is left in the work folder: the resume must say it takes it over
            _check(outcome, "--resume says it takes over the stale lock", "stale lock" in resumed.output().lower())
    else:
        _check(outcome, "the run finishes by itself with exit 0", codes[-1] == 0)
        if any(word in watched.stderr() for word in ("ERROR", "Traceback")):
            outcome["note: dask logged an ERROR / a traceback on stderr"] += 1
    _check_blockwise_result(outcome, runs, folder, output, setup["reference"])
    return outcome, f"{kind} kill at {name} {target}/{setup['passes'][name]} +{jitter * 1000:.0f} ms: {killed}", codes


def _check_blockwise_result(outcome: Counter, runs: list[Watched], folder: Path, output: Path, reference) -> None:
    labels = _read_labels(output)
    _check(outcome, "labels equal the reference", labels is not None and np.array_equal(labels, reference))
    left = _left_in(folder, output)
    _check(outcome, "no work folder or temporary left", not left)
    leftovers = [process for run in runs for process in run.leftovers()]
    _check(outcome, "no process left running", not leftovers)
    if left or leftovers:
        print(f"  left: {left} processes: {leftovers}", flush=True)


def blockwise_trials(work: Path, runs: int, rng: np.random.Generator, shape: tuple, block: tuple) -> Counter:
    setup = _blockwise_setup(work, shape, block)
    reference = setup["folder"] / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    watched = Watched(_blockwise_args(setup, reference / "seg.zarr"), reference / "run")
    code, labels = watched.wait(), _read_labels(reference / "seg.zarr")
    if code != 0 or labels is None or watched.leftovers():
        raise SystemExit(f"reference blockwise run failed (exit {code}):\n{watched.output()[-3000:]}")
    setup["reference"] = labels
    blocks = setup["passes"]["fragments"]
    print(
        f"blockwise full run: {time.perf_counter() - start:.1f} s, {blocks} blocks, {len(np.unique(labels))} labels",
        flush=True,
    )
    combinations = [(kind, name) for kind in ("driver", "worker") for name in BLOCKWISE_PASSES]
    order = [combinations[i] for _ in range(-(-runs // len(combinations))) for i in rng.permutation(len(combinations))]
    outcome: Counter = Counter()
    for trial, (kind, name) in enumerate(order[:runs]):
        target = int(rng.integers(0, setup["passes"][name] + 1))
        folder = setup["folder"] / f"trial_{trial:03d}"
        checked, description, codes = _blockwise_trial(setup, folder, kind, name, target, rng)
        outcome.update(checked)
        failed = [key for key in checked if key.startswith("FAIL")]
        print(
            f"blockwise trial {trial + 1}/{runs}: {description}, exit {codes}{' ' + str(failed) if failed else ''}",
            flush=True,
        )
        if failed:
            for log in sorted(folder.glob("*.err")):
                print(f"  {log.name}: {log.read_text()[-1500:]}", flush=True)
    return outcome


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer-runs", type=int, default=50, help="infer.py SIGKILL trials (0: skip)")
    parser.add_argument("--train-runs", type=int, default=50, help="train.py SIGKILL / SIGTERM trials (0: skip)")
    parser.add_argument("--sigterm-runs", type=int, default=20, help="train.py SIGTERM-after-checkpoint trials")
    parser.add_argument("--sigterm-group", action="store_true",
                        help="send the --sigterm-runs signal to the whole process group, one loader worker")
    parser.add_argument("--blockwise-runs", type=int, default=30, help="blockwise driver / worker kill trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--infer-window",
        type=float,
        nargs=2,
        default=(0.03, 1.1),
        metavar=("LOW", "HIGH"),
        help="infer.py kill moment: uniform in [LOW, HIGH] x the duration of a full run",
    )
    parser.add_argument("--blockwise-shape", type=int, nargs=3, default=(32, 96, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--blockwise-block", type=int, nargs=3, default=(16, 32, 32), metavar=("Z", "Y", "X"))
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    return parser.parse_args()


def _print_table(tables: dict[str, Counter], seconds: dict[str, float], seed: int, total: float) -> int:
    """Prints the counts of every target; returns the number of failed checks."""
    failures = 0
    print(f"\nfault injection, seed {seed}, {total:.0f} s")
    print(f"{'target':<36}{'outcome':<66}{'count':>6}")
    print("-" * 108)
    for target, outcome in tables.items():
        for key, count in sorted(outcome.items()):
            print(f"{target:<36}{key:<66}{count:>6}")
            failures += count if key.startswith("FAIL") or ": FAIL" in key else 0
    for target, elapsed in seconds.items():
        print(f"wall time {target}: {elapsed:.0f} s")
    print(f"failures: {failures}")
    return failures


def main() -> int:
    args = _parse_args()
    rng = np.random.default_rng(args.seed)
    tables: dict[str, Counter] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, trials: Callable[[], Counter]) -> None:
        started = time.perf_counter()
        tables[name] = trials()
        seconds[name] = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="melecole-faults-") as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.infer_runs:
            window = tuple(args.infer_window)
            name = f"infer.py (SIGKILL {window[0]:g}-{window[1]:g} T)"
            timed(name, lambda: infer_trials(work, args.infer_runs, rng, window))
        if args.train_runs or args.sigterm_runs:
            setup = _train_setup(work)
        if args.train_runs:
            timed("train.py (SIGKILL / SIGTERM)", lambda: train_trials(work, setup, args.train_runs, rng))
        if args.sigterm_runs:
            name = "train.py (SIGTERM to the group)" if args.sigterm_group else "train.py (SIGTERM after last.pt)"
            timed(name, lambda: sigterm_trials(work, setup, args.sigterm_runs, rng, args.sigterm_group))
        if args.blockwise_runs:
            shape, block = tuple(args.blockwise_shape), tuple(args.blockwise_block)
            name = "blockwise (SIGKILL driver / worker)"
            timed(name, lambda: blockwise_trials(work, args.blockwise_runs, rng, shape, block))
    failures = _print_table(tables, seconds, args.seed, time.perf_counter() - start)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
