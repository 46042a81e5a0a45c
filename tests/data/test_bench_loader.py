"""bench/bench_loader.py runs end to end on tiny random volumes and prints its table."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest


def test_bench_loader_smoke(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = runpy.run_path(str(repo_root / "bench" / "bench_loader.py"))
    argv = [
        "--config", str(repo_root / "configs" / "synthetic-UNet3D.yaml"),
        "--batches", "1", "--steps", "1", "--repeats", "1", "--volume-shape", "6", "24", "24",
        "DATASET.DATA_ROOT", str(tmp_path / "none"), "MODEL.INPUT_SIZE", "[4, 16, 16]",
        "HARDWARE.DEVICE", "cpu", "AUGMENTATION.ELASTIC.ALPHA", "2.0",
    ]  # fmt: skip
    assert bench["main"](argv) == 0
    output = capsys.readouterr().out
    assert "random volumes" in output
    for row in ("augment Elastic (P=1)", "loader, 0 workers", "loader, 2 workers", "train step"):
        assert row in output
