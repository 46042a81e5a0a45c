"""Blockwise faults end in one line (issue 18, items 7, 9, 10): bad input values, failed writes, a damaged
work folder, a --scheduler that is no dask scheduler, workers that cannot all start, Ctrl-C at start.

Every failure is a DataError / ConfigError (exit code 2, one `error:` line naming the culprit), raised
before anything is committed; the work folder stays resumable (no temporaries, no block marked done that
was not written).
"""

from __future__ import annotations

import errno
import http.server
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.blockwise.__main__ import main
from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import DaskExecutor, SerialExecutor, dask_executor, segment_blockwise, work_folder
from melecole.blockwise.tasks import check_block_values, worker_memory_bytes
from melecole.errors import ConfigError, DataError
from melecole.io.volumes import open_volume, parse_volume_url

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "configs" / "synthetic-UNet3D.yaml")
OPTS = ["BLOCKWISE.OUTPUT_CHUNKS", "[8, 16, 16]", "INFERENCE.MIN_SEGMENT_SIZE", "10", "LOG.PROGRESS_BAR", "False"]


def _quiet(line: str) -> None:
    pass


def _work_files(output: str) -> list[Path]:
    folder = work_folder(parse_volume_url(output))
    return sorted(path for path in folder.rglob("*")) if folder.exists() else []


def _temporaries(output: str) -> list[Path]:
    """Temporaries left in the work folder (MeLeCoLe's ``.<name>...tmp...`` and zarr's ``*.partial``)."""
    return [
        path for path in _work_files(output)
        if path.name.startswith(".") and ".tmp" in path.name or path.name.endswith(".partial")
    ]


def _markers(output: str, name: str) -> set[int]:
    folder = work_folder(parse_volume_url(output)) / "done" / name
    return {int(path.name) for path in folder.iterdir()} if folder.exists() else set()


@pytest.fixture()
def volume(tmp_path, tiny_volume) -> Path:
    """A copy of the tiny volume's HDF5 file that a test may spoil."""
    path = tmp_path / "inputs.hdf"
    with h5py.File(tiny_volume["path"], "r") as source, h5py.File(path, "w") as target:
        for key in ("affinities", "foreground"):
            target[key] = source[key][()]
    return path


def _spoil(path: Path, key: str, where: tuple, value: float) -> None:
    with h5py.File(path, "r+") as handle:
        data = handle[key][()]
        data[where] = value
        del handle[key]
        handle[key] = data


# ------------------------------------------------------------------------------------- item 7


def test_check_block_values_counts_and_locates_bad_values():
    values = np.full((3, 4, 5, 6), 0.5, dtype=np.float32)
    values[1, 2, 3, 4] = np.nan
    values[2, 0, 0, 0] = np.nan
    values[0, 3, 4, 5] = np.inf
    values[0, 1, 1, 1] = 1.5
    values[0, 1, 1, 2] = -0.25
    values[0, 1, 1, 3] = 1.0 + 1e-6
    read = (slice(10, 14), slice(20, 25), slice(30, 36))
    box = (slice(12, 14), slice(20, 25), slice(30, 36))
    with pytest.raises(DataError) as caught:
        check_block_values(values, "aff.zarr", 7, box, read)
    message = str(caught.value)
    assert message.startswith("aff.zarr: block 7 (z 12:14, y 20:25, x 30:36, with its halo): 6 bad values ")
    assert "(2 NaN, 1 Inf, 3 outside [0, 1])" in message
    assert "the first at c 0 z 11 y 21 x 31" in message  # C order: channel 0, (1, 1, 1) + the read's start
    assert "\n" not in message
    # Valid blocks pass: floats in [0, 1] with both ends, uint8 of any value, bool.
    check_block_values(np.array([[[0.0, 1.0]]], dtype=np.float64), "f", 0, read, read)
    check_block_values(np.array([[[0, 255]]], dtype=np.uint8), "u", 0, read, read)
    check_block_values(np.array([[[True, False]]]), "b", 0, read, read)
    with pytest.raises(
        DataError, match=r"1 bad value \(0 NaN, 0 Inf, 1 outside \[0, 1\]\), the first at z 10 y 20 x 31;"
    ):
        check_block_values(np.array([[[1, 2]]], dtype=np.uint16), "u16", 0, read, read)


@pytest.mark.parametrize(
    "case, key, where, value, argv_extra",
    [
        ("nan foreground", "foreground", (5, 30, 40), np.nan, {}),
        ("nan affinities, watershed + mean", "affinities", (0, 12, 20, 33), np.nan,
         {"fragments": "watershed", "agglomeration": "mean"}),
        ("inf affinities", "affinities", (7, 3, 3, 3), np.inf, {}),
        ("affinity above 1", "affinities", (2, 9, 47, 47), 1.25, {}),
        ("affinity below 0", "affinities", (11, 15, 0, 0), -0.5, {}),
    ],
)
def test_bad_input_values_stop_the_run_before_anything_is_committed(
    tmp_path, volume, blockwise_cfg, case, key, where, value, argv_extra
):
    _spoil(volume, key, where, value)
    cfg = blockwise_cfg.clone()
    if "agglomeration" in argv_extra:
        cfg.BLOCKWISE.AGGLOMERATION = argv_extra["agglomeration"]
    options = build_options(cfg, fragments=argv_extra.get("fragments"))
    output = str(tmp_path / "seg.zarr")
    with pytest.raises(DataError) as caught:
        segment_blockwise(
            f"{volume}:affinities", output, options, foreground_url=f"{volume}:foreground",
            executor=SerialExecutor(), progress=False, report=_quiet,
        )
    message = str(caught.value)
    z, y, x = where[-3:]
    assert message.startswith(f"{volume}:{key}: block ") and "\n" not in message
    assert f"1 bad value ({int(np.isnan(value))} NaN, {int(np.isinf(value))} Inf" in message
    assert f"z {z} y {y} x {x}; expected finite probabilities in [0, 1]" in message
    block = int(message.split("block ")[1].split(" ")[0])
    assert block not in _markers(output, "fragments") | _markers(output, "graph")
    assert not Path(output).exists() and not _temporaries(output)


def test_fixed_input_then_resume_finishes_with_the_result_of_a_clean_run(tmp_path, volume, blockwise_cfg):
    """The work folder a bad block left behind is resumable: blocks marked done were complete."""
    options = build_options(blockwise_cfg)
    run = dict(executor=SerialExecutor(), progress=False, report=_quiet)
    clean = str(tmp_path / "clean.zarr")
    segment_blockwise(f"{volume}:affinities", clean, options, **run)
    with h5py.File(volume, "r") as handle:
        good = handle["affinities"][()]
    _spoil(volume, "affinities", (0, 10, 40, 40), np.nan)  # the last blocks: the others finish first
    output = str(tmp_path / "seg.zarr")
    with pytest.raises(DataError, match="1 bad value"):
        segment_blockwise(f"{volume}:affinities", output, options, **run)
    done = _markers(output, "fragments")
    assert 0 < len(done) < 18
    _spoil(volume, "affinities", (0, 10, 40, 40), float(good[0, 10, 40, 40]))
    lines: list[str] = []
    segment_blockwise(f"{volume}:affinities", output, options, resume=True, **{**run, "report": lines.append})
    assert any(f"fragments: resuming, {len(done)} of 18 blocks already done" in line for line in lines)
    np.testing.assert_array_equal(open_volume(output).read(), open_volume(clean).read())


def test_a_task_error_on_dask_arrives_as_the_same_one_line_error(tmp_path, volume, blockwise_cfg, dask_client):
    _spoil(volume, "foreground", (3, 3, 3), np.nan)
    output = str(tmp_path / "seg.zarr")
    with pytest.raises(DataError) as caught:
        segment_blockwise(
            f"{volume}:affinities", output, build_options(blockwise_cfg), foreground_url=f"{volume}:foreground",
            executor=DaskExecutor(dask_client), progress=False, report=_quiet,
        )
    assert type(caught.value) is DataError
    message = str(caught.value)  # the first block to fail: the bad voxel's own, or one whose halo holds it
    block = r"block \d+ \(z \d+:\d+, y \d+:\d+, x \d+:\d+, with its halo\)"
    assert re.match(rf"{re.escape(str(volume))}:foreground: {block}: "
                    r"1 bad value \(1 NaN, 0 Inf, 0 outside \[0, 1\]\), the first at z 3 y 3 x 3; ", message), message
    assert not Path(output).exists() and not _temporaries(output)


def test_cli_bad_values_on_a_scheduler_exit_2_with_one_line(tmp_path, volume, dask_client, capsys):
    _spoil(volume, "affinities", (4, 1, 2, 3), 2.0)
    argv = ["--affinities", f"{volume}:affinities", "--output", str(tmp_path / "seg.zarr"), "--block", "8", "16", "16",
            "--scheduler", dask_client.scheduler.address, "--config", CONFIG, *OPTS]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"error: {volume}:affinities: block " in err and "1 bad value (0 NaN, 0 Inf, 1 outside [0, 1])" in err
    assert "the first at c 4 z 1 y 2 x 3;" in err


# --------------------------------------------------------------------------------- item 9: writes


def _full_disk(file, *args, **kwargs):
    """np.savez on a full disk: part of the file, then ENOSPC."""
    if hasattr(file, "write"):
        file.write(b"PK\x03\x04 half a zip")
    else:
        Path(file).write_bytes(b"PK\x03\x04 half a zip")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_a_graph_removes_the_temporary(tmp_path, tiny_volume, blockwise_cfg, monkeypatch):
    output = str(tmp_path / "seg.zarr")
    monkeypatch.setattr(np, "savez", _full_disk)
    with pytest.raises(DataError) as caught:
        segment_blockwise(
            f"{tiny_volume['path']}:affinities", output, build_options(blockwise_cfg), executor=SerialExecutor(),
            progress=False, report=_quiet,
        )
    message = str(caught.value)
    assert "graph/0.npz': cannot write (No space left on device), expected free disk space" in message
    assert "the temporary file was removed" in message and "--resume" in message and "\n" not in message
    assert not _temporaries(output) and _markers(output, "graph") == set()
    assert len(_markers(output, "fragments")) == 18


class _QuotaArray:
    def __setitem__(self, box, values):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def test_failed_chunk_write_is_one_line_and_leaves_the_block_unmarked(
    tmp_path, tiny_volume, blockwise_cfg, monkeypatch
):
    from melecole.blockwise import tasks

    output = str(tmp_path / "seg.zarr")
    monkeypatch.setattr(tasks, "_open_array", lambda path: _QuotaArray())
    with pytest.raises(DataError, match=r"fragments.zarr': cannot write \(Disk quota exceeded\), expected free disk"):
        segment_blockwise(
            f"{tiny_volume['path']}:affinities", output, build_options(blockwise_cfg), executor=SerialExecutor(),
            progress=False, report=_quiet,
        )
    assert _markers(output, "fragments") == set() and not _temporaries(output)


FILE_SIZE_SCRIPT = """
import sys
from melecole.blockwise.plan import build_options
from melecole.blockwise.runner import SerialExecutor, segment_blockwise
from melecole.config import get_default_cfg
from melecole.utils.cli import run_cli

cfg = get_default_cfg()
cfg.BLOCKWISE.OUTPUT_CHUNKS = [8, 16, 16]
cfg.BLOCKWISE.BLOCK_SHAPE = [8, 16, 16]
cfg.INFERENCE.MIN_SEGMENT_SIZE = 10
run = run_cli(lambda argv: segment_blockwise(
    sys.argv[1], sys.argv[2], build_options(cfg), executor=SerialExecutor(), progress=False, report=print
))
sys.exit(run(None))
"""


def test_file_size_limit_real_write_fails_in_one_line(tmp_path, tiny_volume):
    """``ulimit -f``: the kernel refuses the write (EFBIG) in the middle of a work file."""
    import resource

    limit = 3000  # bytes: the markers, metadata and compressed chunks fit; a block's graph does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    output = str(tmp_path / "seg.zarr")
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_SCRIPT, f"{tiny_volume['path']}:affinities", output],
        capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size, cwd=REPO_ROOT,
    )
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert err.startswith("error: output '") and "\n" not in err, err
    assert "cannot write (File too large), expected free disk space" in err
    assert not _temporaries(output) and not Path(output).exists()


# ------------------------------------------------------------------------------ item 9: damaged reads


class _StopAfter(SerialExecutor):
    """Runs the first ``passes`` passes, then stops like Ctrl-C."""

    def __init__(self, passes: int):
        self.passes = passes

    def map(self, function, items):
        self.passes -= 1
        if self.passes < 0:
            raise KeyboardInterrupt
        return super().map(function, items)


@pytest.mark.parametrize(
    "passes, damage, expected",
    [
        (1, "fragments.zarr/0.0.0", "fragments.zarr/0.0.0: cannot read ("),
        (2, "graph/5.npz", "graph/5.npz: cannot read ("),
        (3, "lookup.npz", "lookup.npz: cannot read ("),
    ],
)
def test_damaged_work_file_then_resume_is_one_line(tmp_path, tiny_volume, blockwise_cfg, passes, damage, expected):
    output = str(tmp_path / "seg.zarr")
    arguments = (f"{tiny_volume['path']}:affinities", output, build_options(blockwise_cfg))
    with pytest.raises(KeyboardInterrupt):
        segment_blockwise(*arguments, executor=_StopAfter(passes), progress=False, report=_quiet)
    path = work_folder(parse_volume_url(output)) / damage
    assert path.is_file()
    path.write_bytes(b"\x28\xb5\x2f\xfd garbage, not what was written" * 3)
    with pytest.raises(DataError) as caught:
        segment_blockwise(*arguments, executor=SerialExecutor(), resume=True, progress=False, report=_quiet)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert message.endswith("the work folder is damaged, --overwrite starts over")
    assert not Path(output).exists()


# --------------------------------------------------------------------------------- item 9: scheduler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def http_server():
    """A plain HTTP server on 127.0.0.1 (it never answers dask's handshake)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def banner_server():
    """A service that greets first, in another protocol (read by dask as a frame count of exabytes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connections = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.sendall(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n")
            connections.append(connection)

    threading.Thread(target=serve, daemon=True).start()
    yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in connections:
        connection.close()


@pytest.mark.parametrize("kind", ["http", "banner", "closed port"])
def test_scheduler_that_is_not_dask_fails_within_the_timeout(kind, request):
    address = {
        "http": lambda: request.getfixturevalue("http_server"),
        "banner": lambda: request.getfixturevalue("banner_server"),
        "closed port": lambda: f"tcp://127.0.0.1:{_free_port()}",
    }[kind]()
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        with dask_executor(2, address, 1.5):
            pass
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert elapsed < 1.5 + 2.0, elapsed
    assert message.startswith(f"--scheduler '{address}': no dask scheduler answered within 1.5 s (")
    assert "\n" not in message
    if kind == "banner":
        assert "does not speak dask's protocol: MemoryError" in message
    if kind == "http":
        assert "no answer in dask's protocol" in message


@pytest.mark.parametrize("timeout", [-3, 0, math.nan, math.inf])
def test_scheduler_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ConfigError) as caught:
        with dask_executor(2, "tcp://127.0.0.1:1", timeout):
            pass
    assert str(caught.value) == f"--scheduler-timeout: {timeout:g}, expected a positive number of seconds"


def test_a_real_scheduler_is_reported_with_its_workers(dask_client):
    lines: list[str] = []
    with dask_executor(2, dask_client.scheduler.address, 5, report=lines.append) as executor:
        assert sorted(executor.client.run(lambda: 1).values()) == [1, 1]
    assert lines == [f"dask: scheduler {dask_client.scheduler.address} with 2 workers"]


# ------------------------------------------------------------------------------ item 10: workers


def test_capacity_warning_names_cores_and_memory(monkeypatch):
    import psutil

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert DaskExecutor.capacity_warning(2, 1e6) is None
    line = DaskExecutor.capacity_warning(3, None)
    assert line.startswith("warning: --workers 3: more than the 2 CPU cores") and "fewer --workers" in line
    available = psutil.virtual_memory().available
    line = DaskExecutor.capacity_warning(2, available)
    assert "more than the 2 CPU cores" not in line and "GB by the memory rule of thumb" in line
    # The rule of thumb: 0.6 GB per padded Mvoxel for mws fragments, 0.21 GB for watershed.
    assert worker_memory_bytes((32, 256, 256), (4, 10, 10), "mws") == pytest.approx(40 * 276 * 276 * 600)
    assert worker_memory_bytes((32, 256, 256), (4, 10, 10), "watershed") == pytest.approx(40 * 276 * 276 * 210)


def test_workers_that_cannot_start_in_time_give_one_line_quickly(monkeypatch, capfd):
    monkeypatch.setattr(DaskExecutor, "START_SECONDS", 0.0)
    monkeypatch.setattr(DaskExecutor, "START_SECONDS_PER_ROUND", 0.05)  # no process starts in 50 ms
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        with dask_executor(2, report=_quiet):
            pass
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert message.startswith("--workers 2: only 0 of 2 dask workers started within 0.05 s") and "\n" not in message
    assert "expected fewer --workers" in message
    assert elapsed < 10, elapsed
    assert "Traceback" not in capfd.readouterr().err


def test_local_cluster_reports_its_workers():
    lines: list[str] = []
    with dask_executor(1, report=lines.append) as executor:
        assert list(executor.client.run(lambda: 1).values()) == [1]
    assert len(lines) == 1 and lines[0].startswith("dask: 1 worker started in ")


INTERRUPT_SCRIPT = """
import sys, time
import distributed
from melecole.blockwise.runner import dask_executor
from melecole.utils.cli import run_cli

def start(argv):
    with dask_executor(1, report=print):
        time.sleep(60)

if __name__ == "__main__":
    sys.exit(run_cli(start)(None))
"""


def _spawning_workers(pid: int) -> bool:
    """True once a child of ``pid`` is a multiprocessing spawn (a dask worker starting)."""
    import psutil

    for child in psutil.Process(pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # gone meanwhile
            continue
    return False


def test_ctrl_c_while_workers_start_prints_no_traceback(tmp_path):
    """Ctrl-C goes to the whole process group: the workers starting must not print tracebacks."""
    script = tmp_path / "start.py"
    script.write_text(INTERRUPT_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _spawning_workers(process.pid):
        time.sleep(0.05)
    time.sleep(0.3)  # the first workers are importing
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert err.strip().endswith("interrupted") and "Traceback" not in err, err
    assert "Traceback" not in out


def test_manifest_of_a_work_folder_is_json(tmp_path):
    """read_manifest (tasks) refuses a damaged manifest in one line."""
    from melecole.blockwise.tasks import read_manifest

    (tmp_path / "manifest.json").write_text("{\"shape\": [1, ")
    with pytest.raises(DataError, match="manifest.json: cannot read .*--overwrite starts over"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"shape": [1]}))
    assert read_manifest(tmp_path) == {"shape": [1]}

