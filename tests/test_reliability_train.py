"""Reliability of training and evaluation (issue 18, items 11-13): run folders are recognised by the
library's marker, never rewritten when they are not the library's; an all-zero ground truth is named;
a run killed inside its first checkpoint write is cleaned and explained on --resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import melecole
from melecole.cli.evaluate import main as evaluate_main
from melecole.cli.train import train_main
from melecole.config import load_cfg
from melecole.engine.checkpoint import load_checkpoint
from melecole.engine.run_folder import RUN_MARKER, read_run_marker
from melecole.engine.trainer import Trainer
from melecole.errors import ConfigError
from melecole.testing import make_tiny_train_opts

REPO = Path(__file__).resolve().parents[1]
QUIET = {"LOG.VAL_FREQUENCY": "0", "LOG.IMAGE_FREQUENCY": "0"}
USER_CONFIG = """# my own settings for the long run (hand-written, keep the comments)
OPTIM:
  TOTAL_ITER: 2  # short test first
"""


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """A 1-iteration run folder made by the library (checkpoints/last.pt and iter_1.pt)."""
    trainer = Trainer(load_cfg(None, make_tiny_train_opts(tmp_path, **QUIET, **{"OPTIM.TOTAL_ITER": "1"})))
    trainer.train()
    return trainer.run_dir


# ------------------------------------------------------------------------------------------------
# Item 11: the marker decides, not a loadable config.yaml
# ------------------------------------------------------------------------------------------------
def test_new_run_folder_has_the_marker(finished_run: Path) -> None:
    record = json.loads((finished_run / RUN_MARKER).read_text())
    assert record["library"] == "melecole" and record["version"] == melecole.__version__
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert "adopted" not in record and record["created"].endswith("+00:00")
    assert not list(finished_run.rglob("*.tmp"))


def test_resume_refuses_a_user_folder_with_a_valid_hand_written_config(finished_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    user = tmp_path / "F"
    (user / "checkpoints").mkdir(parents=True)
    shutil.copy(finished_run / "checkpoints" / "last.pt", user / "checkpoints" / "last.pt")
    (user / "config.yaml").write_text(USER_CONFIG)
    load_cfg(user / "config.yaml")  # valid: the old check took it for a run folder and rewrote it
    before = _hashes(user)
    for resume in (user, user / "checkpoints" / "last.pt"):
        assert train_main(["--resume", str(resume), "OPTIM.TOTAL_ITER", "3"]) == 2
        _one_line_error(capsys, f"'{resume}'", f"'{user}' has no {RUN_MARKER}", "config dump",
                        "nothing was changed", "--supervised_checkpoint")
        assert _hashes(user) == before
        assert sorted(p.name for p in user.rglob("*")) == ["checkpoints", "config.yaml", "last.pt"]


def test_train_py_resume_of_a_user_folder_is_one_line_and_keeps_the_config(finished_run: Path,
                                                                           tmp_path: Path) -> None:
    """The reported command line, through the script (a user's log.txt does not make it ours either)."""
    user = tmp_path / "F"
    (user / "checkpoints").mkdir(parents=True)
    shutil.copy(finished_run / "checkpoints" / "last.pt", user / "checkpoints" / "last.pt")
    (user / "config.yaml").write_text(USER_CONFIG)
    (user / "log.txt").write_text("my notes\n")
    digest = hashlib.sha256((user / "config.yaml").read_bytes()).hexdigest()
    result = subprocess.run([sys.executable, "melecole/train.py", "--resume", str(user), "OPTIM.TOTAL_ITER", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(user) in lines[0] and RUN_MARKER in lines[0] and "--supervised_checkpoint" in lines[0]
    assert hashlib.sha256((user / "config.yaml").read_bytes()).hexdigest() == digest
    assert not (user / RUN_MARKER).exists() and sorted(p.name for p in user.iterdir()) == [
        "checkpoints", "config.yaml", "log.txt"]


def test_run_folder_of_an_earlier_version_is_resumed_and_marked(finished_run: Path) -> None:
    """No marker, but checkpoints/, log.txt and a config.yaml that is the library's dump: ours."""
    (finished_run / RUN_MARKER).unlink()
    assert train_main(["--resume", str(finished_run), "OPTIM.TOTAL_ITER", "2"]) == 0
    assert load_checkpoint(finished_run / "checkpoints" / "last.pt")["iteration"] == 2
    record = read_run_marker(finished_run)
    assert record is not None and record["adopted"] is True
    assert "TOTAL_ITER: 2" in (finished_run / "config.yaml").read_text()
    assert "marked it as ours" in (finished_run / "log.txt").read_text()


def test_edited_config_yaml_is_never_overwritten(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    """Earlier version without marker, or marked: a config.yaml with a person's comment is refused."""
    config = finished_run / "config.yaml"
    config.write_text("# tried LR 1e-3 on Monday\n" + config.read_text())
    marker = (finished_run / RUN_MARKER).read_bytes()
    for marked in (True, False):
        if not marked:
            (finished_run / RUN_MARKER).unlink()
        before = _hashes(finished_run)
        assert train_main(["--resume", str(finished_run), "OPTIM.TOTAL_ITER", "2"]) == 2
        if marked:
            _one_line_error(capsys, "config.yaml' was edited", "KEY VALUE", "nothing was changed")
        else:
            _one_line_error(capsys, f"'{finished_run}' has no {RUN_MARKER}", "edited or written by hand")
        assert _hashes(finished_run) == before
    assert not (finished_run / RUN_MARKER).exists() and marker


def test_trainer_refuses_a_given_run_dir_with_foreign_files(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.yaml").write_text(USER_CONFIG)
    before = _hashes(user)
    cfg = load_cfg(None, make_tiny_train_opts(tmp_path, **QUIET, **{"OPTIM.TOTAL_ITER": "1"}))
    with pytest.raises(ConfigError, match=rf"run folder '{user}': not written by MeLeCoLe .* holds config.yaml"):
        Trainer(cfg, run_dir=user)
    assert _hashes(user) == before and sorted(p.name for p in user.iterdir()) == ["config.yaml"]
    # a folder without any of the library's names is fine: it gets the marker
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert Trainer(cfg, run_dir=other).run_dir == other
    assert read_run_marker(other) is not None and (other / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------
# Item 13: a run killed inside its first checkpoint write
# ------------------------------------------------------------------------------------------------
def _run_without_checkpoint(tmp_path: Path) -> Path:
    """A run folder made by the library whose first checkpoint write was killed (0-byte temporary)."""
    cfg = load_cfg(None, make_tiny_train_opts(tmp_path, **QUIET, **{"LOG.CHECKPOINT_FREQUENCY": "100"}))
    trainer = Trainer(cfg)
    trainer.train(stop_at=1)  # no checkpoint before iteration 6
    run = trainer.run_dir
    assert not any((run / "checkpoints").iterdir())
    return run


def _stale(path: Path) -> Path:
    path.write_bytes(b"")
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def test_resume_of_a_run_that_never_saved_removes_the_temporary_and_says_so(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    run = _run_without_checkpoint(tmp_path)
    temporary = _stale(run / "checkpoints" / ".last.pt.k2j_x9ab.tmp")
    foreign = _stale(run / "checkpoints" / ".mine.tmp")
    for resume in (run, run / "checkpoints"):
        assert train_main(["--resume", str(resume)]) == 2
        line = _one_line_error(capsys, f"'{run}'", "never saved a checkpoint", "may be deleted")
        assert ("removed 1 temporary file" in line) == (resume == run)
        assert not temporary.exists() and foreign.exists()
    # a temporary younger than a few seconds may be a write in progress: kept, and said
    young = run / "checkpoints" / ".last.pt.abcdefgh.tmp"
    young.write_bytes(b"")
    assert train_main(["--resume", str(run)]) == 2
    _one_line_error(capsys, "write in progress", young.name)
    assert young.exists()


def test_resume_of_a_run_with_iter_checkpoints_but_no_last_pt_names_the_latest(
        finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    (finished_run / "checkpoints" / "last.pt").unlink()
    before = _hashes(finished_run)
    assert train_main(["--resume", str(finished_run)]) == 2
    _one_line_error(capsys, "no checkpoints/last.pt but has iter_1.pt",
                    f"--resume {finished_run / 'checkpoints' / 'iter_1.pt'}")
    assert _hashes(finished_run) == before


def test_foreign_folder_without_last_pt_is_not_cleaned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    user = tmp_path / "F"
    (user / "checkpoints").mkdir(parents=True)
    (user / "config.yaml").write_text(USER_CONFIG)
    _stale(user / "checkpoints" / ".last.pt.k2j_x9ab.tmp")
    before = _hashes(user)
    assert train_main(["--resume", str(user)]) == 2
    _one_line_error(capsys, str(user), "no checkpoints/last.pt")
    assert _hashes(user) == before


# ------------------------------------------------------------------------------------------------
# Item 12: an all-zero ground truth
# ------------------------------------------------------------------------------------------------
def _write(path: Path, key: str, array: np.ndarray) -> Path:
    with h5py.File(path, "w") as handle:
        handle[key] = array
    return path


def test_all_zero_ground_truth_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shape = (4, 12, 12)
    gt = _write(tmp_path / "gt.hdf", "labels", np.zeros(shape, np.uint64))
    seg = _write(tmp_path / "seg.hdf", "segmentation", np.ones(shape, np.uint64))
    assert evaluate_main(["--gt", str(gt), "--segmentation", str(seg)]) == 2
    _one_line_error(capsys, f"ground truth {gt} [labels]", "no labelled voxel", "all 576 voxels are 0",
                    "expected at least one voxel with an object id > 0")
    assert not (tmp_path / "seg_cell_sizes.png").exists()


def test_no_voxel_left_names_both_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--compat-original ignores predicted 0: an all-zero prediction leaves nothing to score."""
    labels = np.zeros((4, 12, 12), np.uint64)
    labels[:, :6] = 7
    gt = _write(tmp_path / "gt.hdf", "truth", labels)
    seg = _write(tmp_path / "seg.hdf", "segmentation", np.zeros_like(labels))
    assert evaluate_main(["--gt", str(gt), "--gt-key", "truth", "--segmentation", str(seg), "--compat-original"]) == 2
    _one_line_error(capsys, f"segmentation {seg} [segmentation]", f"ground truth {gt} [truth]", "--compat-original")
    # without it, predicted 0 is an ordinary segment and the scores exist
    assert evaluate_main(["--gt", str(gt), "--gt-key", "truth", "--segmentation", str(seg)]) == 0
