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

from melecole.testing import make_tiny_train_opts, write_box_volume  # noqa: E402

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


@pytest.fixture
def tiny_train_opts():
    """The factory :func:`make_tiny_train_opts` (tiny dataset + config overrides for a CPU run)."""
    return make_tiny_train_opts


@pytest.fixture
def box_volume():
    """The factory :func:`write_box_volume` (a tiny labelled HDF5 volume)."""
    return write_box_volume


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """Factory: makes a folder that this process cannot write (chmod 555, or `chattr +i` when the
    tests run as root, who ignores permissions); skips the test where neither works. Restored at
    teardown."""
    import stat
    import subprocess

    made: list[tuple[Path, str]] = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
            made.append((folder, "chmod"))
        else:
            result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            if result.returncode != 0:
                pytest.skip("running as root without `chattr +i`: no way to make a read-only folder")
            made.append((folder, "chattr"))
        if os.access(folder, os.W_OK):
            pytest.skip(f"could not make {folder} read-only")
        return folder

    yield make
    for folder, how in made:
        if how == "chmod":
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
