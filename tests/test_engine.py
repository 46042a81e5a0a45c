"""Training engine: exact resume, checkpoints, run folder, bad input through train.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.engine.checkpoint import load_checkpoint
from melecole.engine.optim import lr_factor
from melecole.engine.trainer import Trainer, resume_config
from melecole.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]


def write_volume(path: Path, shape=(12, 40, 40), seed=0, raw_shape=None) -> None:
    """Boxes of random ids separated by dark 1-voxel membranes; raw follows the labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    step = 8
    next_id = 1
    for z in range(0, shape[0], 6):
        for y in range(0, shape[1], step):
            for x in range(0, shape[2], step):
                labels[z:z + 6, y + 1:y + step, x + 1:x + step] = next_id
                next_id += 1
    raw = np.where(labels > 0, 180, 40).astype(np.uint8) + rng.integers(0, 30, shape, dtype=np.uint8)
    if raw_shape is not None:
        raw = rng.integers(0, 255, raw_shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["volume"] = raw
        handle["labels"] = labels


def tiny_opts(tmp_path: Path, **extra) -> list[str]:
    for split, seed in (("train", 0), ("val", 1)):
        write_volume(tmp_path / "data" / split / f"{split}.hdf", seed=seed)
    opts = {
        "DATASET.DATA_ROOT": str(tmp_path / "data"),
        "MODEL.INPUT_SIZE": "[8, 32, 32]",
        "MODEL.FILTERS": "[4, 8]",
        "MODEL.POOL_Z": "[False]",
        "MODEL.NORM_GROUPS": "2",
        "MODEL.EMBEDDING_DIMENSION": "4",
        "OPTIM.TOTAL_ITER": "6",
        "OPTIM.BATCH_SIZE": "2",
        "HARDWARE.NUM_WORKERS": "0",
        "HARDWARE.DEVICE": "cpu",
        "LOG.OUTPUT_PATH": str(tmp_path / "runs"),
        "LOG.CHECKPOINT_FREQUENCY": "3",
        "LOG.VAL_FREQUENCY": "3",
        "LOG.VAL_PATCHES": "2",
        "LOG.IMAGE_FREQUENCY": "3",
        "LOG.LOG_FREQUENCY": "1",
        "LOG.PROGRESS_BAR": "False",
        "AUGMENTATION.ELASTIC.P": "0.0",
    }
    opts.update(extra)
    return [item for pair in opts.items() for item in pair]


def test_lr_schedule_shapes():
    cosine = [lr_factor(i, schedule="cosine", total_iterations=100, warmup_iterations=10) for i in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert lr_factor(25, schedule="step", total_iterations=100, step_size=10, step_gamma=0.5) == 0.25


def test_train_writes_run_folder_and_loss_decreases(tmp_path):
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "30", "OPTIM.INITIAL_LR": "0.01"}))
    trainer = Trainer(cfg)
    history = trainer.train()
    run = trainer.run_dir
    assert run.parent == tmp_path / "runs" and run.name.startswith("run-")
    for name in ("config.yaml", "log.txt", "checkpoints/last.pt", "checkpoints/iter_30.pt", "checkpoints/iter_3.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert load_cfg(run / "config.yaml").MODEL.FILTERS == [4, 8]
    assert len(history) == 30
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < first
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["iteration"] == 30
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert "val iter" in (run / "log.txt").read_text()
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tmp_path, workers):
    opts = tiny_opts(tmp_path, **{"HARDWARE.NUM_WORKERS": str(workers), "OPTIM.TOTAL_ITER": "6"})
    reference = Trainer(load_cfg(None, opts), run_dir=tmp_path / "reference")
    reference.train()

    interrupted = Trainer(load_cfg(None, opts), run_dir=tmp_path / "interrupted")
    interrupted.train(stop_at=3)  # checkpoint at iteration 3 (LOG.CHECKPOINT_FREQUENCY)
    cfg, checkpoint = resume_config(tmp_path / "interrupted" / "checkpoints" / "iter_3.pt")
    resumed = Trainer(cfg, resume_checkpoint=checkpoint)
    assert resumed.iteration == 3 and resumed.run_dir == (tmp_path / "interrupted").resolve()
    resumed.train()
    for (name, expected), actual in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7, msg=name)
    assert reference.optimizer.param_groups[0]["lr"] == pytest.approx(resumed.optimizer.param_groups[0]["lr"])
    assert [h["loss"] for h in reference.history[3:]] == pytest.approx([h["loss"] for h in resumed.history], abs=1e-6)


def test_supervised_checkpoint_shape_mismatch_lists_keys(tmp_path):
    trainer = Trainer(load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "1"})))
    trainer.train()
    checkpoint = trainer.run_dir / "checkpoints" / "last.pt"
    other = load_cfg(None, tiny_opts(tmp_path, **{"MODEL.EMBEDDING_DIMENSION": "6", "MODEL.FILTERS": "[4, 16]"}))
    with pytest.raises(CheckpointError, match=r"MODEL.FILTERS: checkpoint \[4, 8\] vs config \[4, 16\].*"
                                              r"MODEL.EMBEDDING_DIMENSION: checkpoint 4 vs config 6"):
        Trainer(other, supervised_checkpoint=checkpoint)
    # same shape, different learning rate: allowed, weights are copied
    same = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.INITIAL_LR": "0.0001"}))
    fine_tune = Trainer(same, supervised_checkpoint=checkpoint)
    for expected, actual in zip(trainer.model.state_dict().values(), fine_tune.model.state_dict().values()):
        torch.testing.assert_close(actual, expected)
    assert fine_tune.iteration == 0


def test_missing_data_folder(tmp_path):
    cfg = load_cfg(None, tiny_opts(tmp_path, **{"DATASET.DATA_ROOT": str(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match="DATASET.DATA_ROOT.*nowhere"):
        Trainer(cfg)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "melecole/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_train_cli_end_to_end_and_bad_input(tmp_path):
    config = tmp_path / "tiny.yaml"
    dumped = load_cfg(None, tiny_opts(tmp_path, **{"OPTIM.TOTAL_ITER": "2"})).dump()
    config.write_text(dumped.replace("RUN_NAME: run", "RUN_NAME: ''"))  # '' = name runs after the file
    result = run_train("--config", str(config))
    assert result.returncode == 0, result.stderr
    run = next((tmp_path / "runs").glob("tiny-*"))
    assert (run / "checkpoints" / "iter_2.pt").is_file()

    # unknown key
    bad = tmp_path / "unknown.yaml"
    bad.write_text("MODEL:\n  FILTRES: [4, 8]\n")
    assert_one_line_error(run_train("--config", str(bad)), "unknown.yaml", "MODEL.FILTRES")
    # yaml syntax error
    bad.write_text("MODEL:\n  FILTERS: [4, 8\n")
    assert_one_line_error(run_train("--config", str(bad)), "unknown.yaml", "YAML syntax error")
    # unknown command-line key
    assert_one_line_error(run_train("--config", str(config), "OPTIM.LR", "1"), "OPTIM.LR")
    # missing data folder
    assert_one_line_error(run_train("--config", str(config), "DATASET.DATA_ROOT", str(tmp_path / "gone")),
                          "DATASET.DATA_ROOT", "gone")
    # checkpoint of a differently shaped model
    assert_one_line_error(
        run_train("--config", str(config), "--supervised_checkpoint", str(run / "checkpoints" / "last.pt"),
                  "MODEL.EMBEDDING_DIMENSION", "8"),
        "MODEL.EMBEDDING_DIMENSION", "last.pt")
    # resume continues the same run to a larger TOTAL_ITER
    result = run_train("--resume", str(run), "OPTIM.TOTAL_ITER", "3")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 3


def test_bad_volumes_are_named(tmp_path):
    opts = tiny_opts(tmp_path)
    write_volume(tmp_path / "data" / "train" / "train.hdf", raw_shape=(12, 41, 40))
    shapes = r"\(12, 41, 40\).*\(12, 40, 40\)|\(12, 40, 40\).*\(12, 41, 40\)"
    with pytest.raises(DataError, match=rf"train.hdf.*({shapes})"):
        Trainer(load_cfg(None, opts)).train()
    write_volume(tmp_path / "data" / "train" / "train.hdf")
    with pytest.raises(DataError, match=r"train.hdf.*'raw'"):
        Trainer(load_cfg(None, opts + ["DATASET.RAW_KEY", "raw"])).train()
