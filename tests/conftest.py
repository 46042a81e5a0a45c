"""Shared test fixtures: tiny shapes, one thread, the real volumes in ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per test process and its subprocesses: tiny tensors gain nothing from more, and two
# threads on a core that another job uses make small convolutions many times slower. Set before
# torch is imported; HARDWARE.NUM_THREADS auto respects it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real FIB-SEM volumes); the test is skipped when the folder is absent."""
    if not (SHARED_DATA / "fib-gala").is_dir():
        pytest.skip(f"real EM volumes not found at {SHARED_DATA}/fib-gala (../shared/data is absent)")
    return SHARED_DATA


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
