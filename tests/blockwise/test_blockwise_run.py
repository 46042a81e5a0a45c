"""Blockwise runs on files: engines, determinism, resume after a killed driver, a killed worker, the CLI."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import (
    DaskExecutor,
    SerialExecutor,
    dask_executor,
    segment_blockwise,
    work_folder,
    worker_environment,
)
from melecole.blockwise.segment import segment_blockwise_in_memory
from melecole.cli.blockwise import main
from melecole.config import load_cfg
from melecole.io.volumes import open_volume, parse_volume_url

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "configs" / "synthetic-UNet3D.yaml")
OPTS = [
    "BLOCKWISE.OUTPUT_CHUNKS", "[8, 16, 16]", "INFERENCE.MIN_SEGMENT_SIZE", "10", "LOG.PROGRESS_BAR", "False"
]


class ReversedExecutor(SerialExecutor):
    """Runs blocks last to first: results must not depend on the order."""

    def map(self, function, items):
        return (function(item) for item in reversed(list(items)))


def _read(url: str) -> np.ndarray:
    return open_volume(url).read()


@pytest.fixture(scope="module")
def reference(tiny_volume, blockwise_cfg) -> np.ndarray:
    """The in-memory blockwise result (blocks 8 x 16 x 16) the file-based runs must reproduce exactly."""
    segmentation, _ = segment_blockwise_in_memory(tiny_volume["affinities"], build_options(blockwise_cfg))
    return segmentation


def test_engines_and_block_order_give_identical_results(tmp_path, tiny_volume, blockwise_cfg, reference, dask_client):
    affinities = f"{tiny_volume['path']}:affinities"
    options = build_options(blockwise_cfg)
    lines: list[str] = []
    for name, executor in (("serial", ReversedExecutor()), ("dask", DaskExecutor(dask_client))):
        output = str(tmp_path / f"{name}.zarr")
        segment_blockwise(affinities, output, options, executor=executor, progress=False, report=lines.append)
        np.testing.assert_array_equal(_read(output), reference)
        assert not work_folder(parse_volume_url(output)).exists()
    assert any(line.startswith("fragments: 18 blocks in ") and "Mvoxel/s" in line for line in lines)
    assert len(np.unique(reference)) > 10


def _die_once(flag: str, function, index: int):
    """Kills the worker process running it, the first time only (a worker lost mid-task)."""
    if index == 5 and not os.path.exists(flag):
        Path(flag).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return function(index)


class DyingWorkerExecutor(DaskExecutor):
    def __init__(self, client, flag: str):
        super().__init__(client)
        self.flag = flag

    def map(self, function, items):
        return super().map(functools.partial(_die_once, self.flag, function), items)


def test_killed_worker_is_retried_with_identical_result(tmp_path, tiny_volume, blockwise_cfg, reference, dask_client):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    before = set(dask_client.run(os.getpid).values())
    flag = tmp_path / "killed"
    output = str(tmp_path / "seg.zarr")
    executor = DyingWorkerExecutor(dask_client, str(flag))
    segment_blockwise(
        f"{tiny_volume['path']}:affinities", output, build_options(blockwise_cfg), executor=executor,
        progress=False, report=lambda line: None,
    )
    assert int(flag.read_text()) in before  # a worker process really died mid-task
    np.testing.assert_array_equal(_read(output), reference)


@pytest.mark.slow
def test_killed_driver_then_resume_gives_identical_result(tmp_path, tiny_volume, reference, dask_client, capsys):
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), "--block", "8", "16", "16"]
    command = [sys.executable, "-m", "melecole.blockwise", *argv, "--workers", "2", "--config", CONFIG, *OPTS]
    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    markers = work_folder(parse_volume_url(str(output))) / "done" / "fragments"
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and len(list(markers.glob("*"))) < 2:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # driver, scheduler and workers: no clean-up at all
    process.wait()
    assert not output.exists() and len(list(markers.glob("*"))) >= 2
    code = main([*argv, "--scheduler", dask_client.scheduler.address, "--resume", "--config", CONFIG, *OPTS])
    out = capsys.readouterr().out
    assert code == 0
    assert "fragments: resuming, " in out and " of 18 blocks already done" in out
    np.testing.assert_array_equal(_read(str(output)), reference)
    assert main([*argv, "--resume", "--config", CONFIG, *OPTS]) == 0  # complete: nothing to do
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_one_worker_equals_two_workers(tmp_path, tiny_volume, capsys):
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--foreground", f"{tiny_volume['path']}:foreground"]
    code = main([*argv, "--output", f"{output}:seg", "--block", "8", "16", "16", "--workers", "1",
                 "--config", CONFIG, *OPTS])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("fragments", "graph", "agglomerate", "relabel"):
        assert f"\n{name}: " in out
    volume = open_volume(f"{output}:seg")
    assert volume.dtype == np.uint64 and volume.chunks == (8, 16, 16)
    # The in-memory reference runs the same config (its background fill included) on the same foreground.
    cfg = load_cfg(CONFIG, OPTS)
    options = build_options(cfg, block_shape=(8, 16, 16))
    ones = np.ones(tiny_volume["labels"].shape, np.float32)
    expected, _ = segment_blockwise_in_memory(tiny_volume["affinities"], options, ones)
    np.testing.assert_array_equal(volume.read(), expected)


def test_worker_environment_keeps_glibc_thresholds_unless_configured():
    import dask

    environment = worker_environment()
    assert environment["MALLOC_MMAP_THRESHOLD_"] == 32 << 20 and environment["MALLOC_TRIM_THRESHOLD_"] == 64 << 20
    assert environment["OMP_NUM_THREADS"] == environment["ZARR_THREADING__MAX_WORKERS"] == 1
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 0}):
        custom = worker_environment()
    assert custom["MALLOC_TRIM_THRESHOLD_"] == 0 and "MALLOC_MMAP_THRESHOLD_" not in custom


@pytest.mark.slow
def test_local_cluster_workers_start_with_that_environment(monkeypatch):
    # dask lets the driver's environment win; an earlier LocalCluster of this process (the dask_client
    # fixture) left dask's own MALLOC_TRIM_THRESHOLD_ there.
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_executor(1) as executor:
        names = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
        seen = executor.client.run(lambda: {name: os.environ.get(name) for name in names})
    assert list(seen.values()) == [{"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "OMP_NUM_THREADS": "1"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("channels", "12 channels, expected 3 (one per INFERENCE.OFFSETS entry"),
        ("foreground", "shape [4, 8, 8], expected the affinities' (Z, Y, X) [16, 48, 48]"),
        ("missing", "missing.hdf"),
        ("exists", "already exists, expected --resume or --overwrite"),
        ("block", "--block: [8, 20, 16] is not a multiple of the output chunks"),
        ("scheduler", "no dask scheduler answered within 1 s"),
        ("not zarr", "not a zarr URL, expected a zarr folder"),
        ("interrupted", "an interrupted run of this output, expected --resume to finish it or --overwrite"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_volume, capsys, case, expected):
    path = tiny_volume["path"]
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", f"{path}:affinities", "--output", str(output), "--config", CONFIG]
    opts = list(OPTS)
    if case == "channels":
        opts += ["INFERENCE.OFFSETS", "[[-1, 0, 0], [0, -1, 0], [0, 0, -1]]"]
    elif case == "foreground":
        argv += ["--foreground", f"{path}:short"]
    elif case == "missing":
        argv[1] = str(tmp_path / "missing.hdf:affinities")
    elif case == "exists":
        output.mkdir()
    elif case == "block":
        argv += ["--block", "8", "20", "16"]
    elif case == "scheduler":
        argv += ["--scheduler", f"tcp://127.0.0.1:{_free_port()}", "--scheduler-timeout", "1"]
    elif case == "not zarr":
        argv[3] = str(tmp_path / "seg.hdf")
    elif case == "interrupted":
        (work_folder(parse_volume_url(str(output))) / "done").mkdir(parents=True)
        (work_folder(parse_volume_url(str(output))) / "manifest.json").write_text("{}")
    code = main(argv + opts)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_watershed_fill_reads_the_foreground_of_each_block(tmp_path, tiny_volume, blockwise_cfg):
    """Blocks on files (the relabel task reads the foreground with the fill halo) equal the in-memory
    run with the same foreground, and the watershed fill is not the nearest fill there."""
    import h5py
    from scipy import ndimage

    labels = tiny_volume["labels"]
    edges = ndimage.morphological_gradient(labels, size=(1, 3, 3)) > 0
    distance = ndimage.distance_transform_edt(~edges)
    foreground = np.clip(distance / 4.0, 0, 1).astype(np.float32)  # 0 on the boundaries, 1 inside
    path = tmp_path / "fg.hdf"
    with h5py.File(path, "w") as handle:
        handle["foreground"] = foreground
    cfg = blockwise_cfg.clone()
    cfg.INFERENCE.MWS_BACKGROUND = 0.9
    output = str(tmp_path / "seg.zarr")
    segment_blockwise(
        f"{tiny_volume['path']}:affinities", output, build_options(cfg), foreground_url=f"{path}:foreground",
        executor=SerialExecutor(), progress=False, report=lambda line: None,
    )
    expected, _ = segment_blockwise_in_memory(tiny_volume["affinities"], build_options(cfg), foreground)
    np.testing.assert_array_equal(_read(output), expected)
    cfg.INFERENCE.FILL_MODE = "nearest"
    nearest, _ = segment_blockwise_in_memory(tiny_volume["affinities"], build_options(cfg), foreground)
    assert 0 not in expected and 0 not in nearest
    assert np.count_nonzero(nearest != expected) > 100
