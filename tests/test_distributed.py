"""Distributed training on CPU (gloo): DDP equivalence, failure of one rank, the CLI end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.cli.train import build_train_parser, train_distributed
from melecole.config import load_cfg
from melecole.engine.checkpoint import load_checkpoint, unwrap_model
from melecole.engine.launch import (
    is_torchrun_environment,
    launch,
    select_backend,
)
from melecole.errors import MeLeCoLeError

REPO = Path(__file__).resolve().parents[1]
PATCH = (8, 32, 32)
STEPS = 3


def box_labels(shape: tuple[int, int, int], shift: int = 0) -> np.ndarray:
    """Boxes of distinct ids separated by 1-voxel boundaries (id 0), shifted in y/x by ``shift``."""
    z, y, x = np.indices(shape)
    y, x = y + shift, x + 2 * shift
    labels = 1 + (z // 4) * 100 + (y // 8) * 10 + x // 8
    labels[(y % 8 == 0) | (x % 8 == 0)] = 0
    return labels.astype(np.uint32)


def write_tiny_data(root: Path) -> None:
    """train/ and val/ volumes (12, 40, 40) whose raw is bright inside objects, dark on boundaries."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        labels = box_labels((12, 40, 40), shift=3 if split == "val" else 0)
        noise = rng.integers(0, 30, labels.shape, dtype=np.uint8)
        raw = np.where(labels > 0, 180, 40).astype(np.uint8) + noise
        (root / split).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / split / f"{split}.hdf", "w") as handle:
            handle["volume"] = raw
            handle["labels"] = labels


def tiny_opts(tmp_path: Path, **extra: str) -> list[str]:
    write_tiny_data(tmp_path / "data")
    opts = {
        "DATASET.DATA_ROOT": str(tmp_path / "data"),
        "MODEL.INPUT_SIZE": str(list(PATCH)),
        "MODEL.FILTERS": "[4, 8]",
        "MODEL.POOL_Z": "[False]",
        "MODEL.NORM": "group",
        "MODEL.NORM_GROUPS": "2",
        "MODEL.EMBEDDING_DIMENSION": "4",
        "OPTIM.TOTAL_ITER": "3",
        "OPTIM.BATCH_SIZE": "1",
        "OPTIM.INITIAL_LR": "0.01",
        "HARDWARE.NUM_WORKERS": "0",
        "HARDWARE.DEVICE": "cpu",
        "LOG.OUTPUT_PATH": str(tmp_path / "runs"),
        "LOG.CHECKPOINT_FREQUENCY": "2",
        "LOG.VAL_FREQUENCY": "2",
        "LOG.VAL_PATCHES": "1",
        "LOG.IMAGE_FREQUENCY": "0",
        "LOG.LOG_FREQUENCY": "1",
        "LOG.PROGRESS_BAR": "False",
        "AUGMENTATION.ELASTIC.P": "0.0",
    }
    opts.update(extra)
    return [item for pair in opts.items() for item in pair]


def fixed_batches() -> list[dict[str, torch.Tensor]]:
    """STEPS batches of 2 patches (B = 2): raw (2, 1, Z, Y, X) float, labels (2, Z, Y, X) int64."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        labels = np.stack([box_labels(PATCH, shift=2 * step + i) for i in range(2)])
        labels = torch.from_numpy(labels.astype(np.int64))
        raw = (labels > 0).float()[:, None] * 0.6 + 0.4 * torch.rand((2, 1, *PATCH), generator=generator)
        batches.append({"raw": raw, "labels": labels})
    return batches


def _equivalence_worker(argument: tuple[list[str], str]) -> None:
    """One rank of the DDP run: 3 steps on patch ``rank`` of each fixed batch (B = 1)."""
    from melecole.engine.trainer import Trainer

    opts, output = argument
    trainer = Trainer(load_cfg(None, opts))
    rank = trainer.rank
    for batch in fixed_batches():
        trainer.run_step({name: value[rank:rank + 1] for name, value in batch.items()})
    torch.save(unwrap_model(trainer.model).state_dict(), f"{output}.rank{rank}")


def test_ddp_two_processes_batch_one_equal_one_process_batch_two(tmp_path):
    from melecole.engine.trainer import Trainer

    opts = tiny_opts(tmp_path, **{"LOG.VAL_FREQUENCY": "0"})
    output = tmp_path / "ddp_state.pt"
    launch(_equivalence_worker, (opts, str(output)), world_size=2, backend="gloo")

    reference = Trainer(load_cfg(None, opts + ["OPTIM.BATCH_SIZE", "2"]))
    for batch in fixed_batches():
        reference.run_step(batch)
    expected = reference.model.state_dict()
    ranks = [torch.load(f"{output}.rank{rank}") for rank in range(2)]
    for name, value in expected.items():
        for state in ranks:
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-5, msg=name)
    # the parameters did move: the comparison is not between two untouched initialisations
    initial = Trainer(load_cfg(None, opts)).model.state_dict()
    assert max(float((expected[name] - initial[name]).abs().max()) for name in expected) > 1e-3


def test_environment_and_backend():
    assert is_torchrun_environment({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                    "MASTER_PORT": "1"})
    assert not is_torchrun_environment({"RANK": "0", "WORLD_SIZE": "2"})
    assert select_backend("cpu") == "gloo"
    assert select_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def run_script(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE")}
    # the checkout's package, even where the installed one is missing or stale
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment.update(env or {})
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=environment)


def _failing_worker(args) -> None:
    """A training worker whose rank 1 raises at iteration 1 while rank 0 waits in the all-reduce."""
    from melecole.engine.trainer import Trainer

    class FailingTrainer(Trainer):
        def run_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
            if self.rank == 1 and self.iteration >= 1:
                raise MeLeCoLeError(f"rank 1 fails at iteration {self.iteration} (test worker)")
            return super().run_step(batch)

    FailingTrainer(load_cfg(args.config, args.opts)).train()


def test_failing_rank_stops_the_launch(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "50"})).dump())
    monkeypatch.setenv("MELECOLE_DIST_TIMEOUT", "300")
    args = build_train_parser("test").parse_args(["--config", str(config), "HARDWARE.NUM_GPUS", "2"])
    start = time.monotonic()
    exit_code = train_distributed(args, worker=_failing_worker)
    elapsed = time.monotonic() - start
    stderr = capsys.readouterr().err
    assert elapsed < 60, elapsed
    assert exit_code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    expected = "error: rank 1: rank 1 fails at iteration 1 (test worker)"
    assert errors == [expected], stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_train_distributed_cli_then_train_and_infer(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(load_cfg(None, tiny_opts(tmp_path)).dump())
    result = run_script("melecole/train_distributed.py", "--config", str(config), "HARDWARE.NUM_GPUS", "2",
                        "HARDWARE.DEVICE", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = (tmp_path / "runs").iterdir()  # both ranks used rank 0's run folder
    last = run / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["iteration"] == 3
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    log = (run / "log.txt").read_text()
    assert "2 process(es)" in log and "val iter 2" in log
    checkpoints = sorted(path.name for path in (run / "checkpoints").iterdir())
    assert checkpoints == ["iter_2.pt", "iter_3.pt", "last.pt"]

    result = run_script("melecole/train.py", "--config", str(config), "--supervised_checkpoint", str(last),
                        "OPTIM.TOTAL_ITER", "1", "LOG.RUN_NAME", "fine-tune")
    assert result.returncode == 0, result.stderr
    result = run_script("infer.py", "--split", "val", "--config", str(config), "--checkpoint", str(last))
    assert result.returncode == 0, result.stderr


def _worker_pids(parent: int) -> list[int]:
    """Worker processes (multiprocessing spawn children) of process ``parent``, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGTERM-group"])
def test_stopping_the_launcher_stops_its_workers(tmp_path, signal_name):
    """kill -9 of the launcher: its workers are gone within 30 s. SIGTERM (docker stop): the launcher
    passes it on, rank 0 saves last.pt, everything leaves like after Ctrl-C. SIGTERM-group: the same
    signal reaches launcher, ranks and their loader workers at once (SLURM's scancel, kill -- -PGID)."""
    import signal

    group = signal_name.endswith("-group")
    config = tmp_path / "tiny.yaml"
    config.write_text(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "100000", "LOG.VAL_FREQUENCY": "0",
                                                             "HARDWARE.NUM_WORKERS": "1" if group else "0"})).dump())
    environment = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen([sys.executable, "melecole/train_distributed.py", "--config", str(config),
                                 "HARDWARE.NUM_GPUS", "2"], cwd=REPO, env=environment,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=group)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = list((tmp_path / "runs").glob("*/log.txt"))
            if logs and "iter 2/" in logs[0].read_text():
                break
            time.sleep(0.3)
        workers = _worker_pids(launcher.pid)
        assert len(workers) == 2, workers
        if group:
            os.killpg(launcher.pid, signal.SIGTERM)
        else:
            launcher.send_signal(getattr(signal, signal_name))
        stderr = launcher.communicate(timeout=90)[1]
        start = time.monotonic()
        while any(_alive(pid) for pid in workers) and time.monotonic() - start < 30:
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in workers), f"workers alive {time.monotonic() - start:.0f} s later"
        if signal_name.startswith("SIGTERM"):
            assert launcher.returncode == 130 and "Traceback" not in stderr, stderr
            (run,) = (tmp_path / "runs").iterdir()
            assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] >= 2
            assert "interrupted at iteration" in (run / "log.txt").read_text()
    finally:  # never leave a training process behind, whatever failed
        for pid in workers or _worker_pids(launcher.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_watch_parent_stops_an_orphaned_worker():
    import signal

    child = ("import os, time\nfrom melecole.engine.launch import watch_parent\n"
             "watch_parent(os.getppid())\nprint('ready', flush=True)\ntime.sleep(600)\n")
    parent = ("import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
              "print(child.pid, flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True)
    worker = int(process.stdout.readline())
    try:
        assert process.stdout.readline().strip() == "ready"
        assert _alive(worker)
        process.send_signal(signal.SIGKILL)
        process.wait()
        start = time.monotonic()
        while _alive(worker) and time.monotonic() - start < 10:
            time.sleep(0.2)
        assert not _alive(worker), "the orphaned worker still runs 10 s after its launcher died"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
