"""Shared test fixtures: tiny shapes, one thread, the real volumes in ../shared/data when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
