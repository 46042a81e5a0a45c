"""The blockwise output never touches what MeLeCoLe did not write (issue 18, items 1-6, 8, 9).

Every refusal is one `error:` line, exit code 2, and leaves every pre-existing file and folder as it
was (a hash of the whole tree before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from melecole.blockwise.output import output_target
from melecole.cli.blockwise import main
from melecole.io.ownership import check_replaceable, read_own_attributes
from melecole.io.volumes import open_volume, write_volume

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "configs" / "synthetic-UNet3D.yaml")
OPTS = ["BLOCKWISE.OUTPUT_CHUNKS", "[8, 16, 16]", "INFERENCE.MIN_SEGMENT_SIZE", "10", "LOG.PROGRESS_BAR", "False"]


def tree_hash(folder: Path) -> str:
    """Hash of every path (files, folders, symlinks) under ``folder`` and every file's bytes."""
    digest = hashlib.sha256()
    for root, folders, files in sorted(os.walk(folder)):
        for name in sorted(folders + files):
            path = Path(root) / name
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def scheduler(client) -> list[str]:
    """Runs on the session's 2-worker cluster (tests/blockwise/conftest.py) instead of a new LocalCluster."""
    return ["--scheduler", client.scheduler.address]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([*argv, "--config", CONFIG, *OPTS])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_one_line(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err


@pytest.fixture()
def affinities_zarr(tmp_path, tiny_volume) -> str:
    """The tiny affinities as a zarr array, plus a sibling raw array in the same group."""
    group = tmp_path / "grp.zarr"
    write_volume(f"{group}:aff", tiny_volume["affinities"], chunks=(12, 8, 16, 16))
    write_volume(f"{group}:raw", tiny_volume["labels"].astype(np.uint8), chunks=(8, 16, 16))
    return f"{group}:aff"


def test_overwrite_refuses_a_user_folder_that_ends_in_zarr(tmp_path, tiny_volume, capsys):
    user = tmp_path / "u.zarr"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    before = tree_hash(tmp_path)
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(user), "--overwrite"]
    code, _, err = run(argv, capsys)
    assert_one_line(code, err, "was not written by MeLeCoLe", "notes.txt", "nothing was touched")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize(
    "output, relation",
    [("grp.zarr", "contains the input --affinities"), ("grp.zarr:aff", "is the input --affinities"),
     ("grp.zarr/aff/seg.zarr", "lies inside the input --affinities"), ("link.zarr", "is the input --affinities")],
)
def test_output_overlapping_an_input_is_refused_whatever_the_flags(
    tmp_path, affinities_zarr, capsys, output, relation
):
    (tmp_path / "link.zarr").symlink_to(tmp_path / "grp.zarr" / "aff")
    before = tree_hash(tmp_path)
    for flag in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run(["--affinities", affinities_zarr, "--output", str(tmp_path / output), *flag], capsys)
        assert_one_line(code, err, relation)
        assert tree_hash(tmp_path) == before


def test_output_inside_an_hdf5_input_folder_and_foreground_overlap(tmp_path, tiny_volume, affinities_zarr, capsys):
    before = tree_hash(tmp_path)
    foreground = affinities_zarr.replace(":aff", ":raw")
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--foreground", foreground,
            "--output", str(tmp_path / "grp.zarr"), "--overwrite"]
    code, _, err = run(argv, capsys)
    assert_one_line(code, err, "contains the input --foreground")
    assert tree_hash(tmp_path) == before


def test_overwrite_replaces_only_its_own_output(tmp_path, tiny_volume, capsys, dask_client):
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), *scheduler(dask_client)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    mark = read_own_attributes(output)
    assert mark["kind"] == "blockwise-segmentation" and mark["complete"] is True
    assert mark["fingerprint"]["affinities"] == f"{tiny_volume['path']}:affinities"
    first = open_volume(output).read()
    code, _, err = run([*argv, "--overwrite", "--fragments", "watershed"], capsys)
    assert code == 0, err
    assert read_own_attributes(output)["fingerprint"]["options"]["fragments"] == "watershed"
    assert not np.array_equal(open_volume(output).read(), first)
    (output / "notes.txt").write_text("mine now")  # a user's file inside the output: no longer replaceable
    before = tree_hash(tmp_path)
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert_one_line(code, err, "holds entries MeLeCoLe did not write (notes.txt)")
    assert tree_hash(tmp_path) == before


def test_key_into_a_folder_that_is_not_a_zarr_group_is_refused(tmp_path, tiny_volume, capsys):
    (tmp_path / "plain.zarr").mkdir()
    (tmp_path / "plain.zarr" / "notes.txt").write_text("x")
    before = tree_hash(tmp_path)
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", f"{tmp_path / 'plain.zarr'}:seg"]
    code, _, err = run(argv, capsys)
    assert_one_line(code, err, "is not a zarr group")
    assert tree_hash(tmp_path) == before


def test_output_under_a_file_or_in_a_read_only_folder_is_refused_before_any_work(tmp_path, tiny_volume, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(tmp_path / "afile" / "seg.zarr")]
    code, _, err = run(argv, capsys)
    assert_one_line(code, err, "is a file, expected a folder")
    if os.geteuid() == 0:
        return  # root writes into read-only folders: nothing to refuse
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    code, _, err = run([*argv[:3], str(locked / "seg.zarr")], capsys)
    assert_one_line(code, err, "is not writable")


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "melecole.blockwise", *argv, "--config", CONFIG, *OPTS]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_concurrent_runs_give_one_refusal_and_one_correct_output(tmp_path, tiny_volume, capsys, dask_client):
    output = tmp_path / "cc.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), "--workers", "1"]
    first = _start(argv, tmp_path)
    lock = output_target(str(output)).workdir / "lock"
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    code, _, err = run([*argv, "--fragments", "watershed", "--overwrite"], capsys)
    assert_one_line(code, err, "another run is writing this output", f"pid {first.pid} on ")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    reference = _reference(tmp_path, tiny_volume, capsys, dask_client)
    np.testing.assert_array_equal(open_volume(output).read(), reference)
    assert read_own_attributes(output)["fingerprint"]["options"]["fragments"] == "mws"


def _reference(tmp_path: Path, tiny_volume: dict, capsys, dask_client) -> np.ndarray:
    output = tmp_path / "reference.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), *scheduler(dask_client)]
    assert run(argv, capsys)[0] == 0
    return open_volume(output).read()


HOLD_LOCK = """
import sys, time
from melecole.io.ownership import OutputLock
with OutputLock(sys.argv[1], "holder", report=print):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_held_lock_refuses_and_a_stale_lock_is_taken_over(tmp_path, tiny_volume, capsys, dask_client):
    output = tmp_path / "seg.zarr"
    workdir = output_target(str(output)).workdir
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), *scheduler(dask_client)]
    holder = subprocess.Popen(  # another process holds the lock (in this process the lock is re-entrant)
        [sys.executable, "-c", HOLD_LOCK, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(argv, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert_one_line(code, err, "another run is writing this output", f"pid {holder.pid} on ")
    assert not output.exists()
    # A lock file whose owner is gone (killed: the kernel dropped its flock) is taken over.
    (workdir / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": 0}))
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "taking over the stale lock of an ended run (pid 999999 on elsewhere" in out
    assert not workdir.exists() and output.exists()


def test_resume_refuses_what_is_not_this_commands_finished_output(tmp_path, tiny_volume, capsys, dask_client):
    source = f"{tiny_volume['path']}:affinities"
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", source, "--output", str(output), *scheduler(dask_client)]
    (tmp_path / "x.zarr").mkdir()
    code, _, err = run([*argv[:3], str(tmp_path / "x.zarr"), "--resume"], capsys)
    assert_one_line(code, err, "is not a finished MeLeCoLe output")
    assert run(argv, capsys)[0] == 0
    before = tree_hash(tmp_path)
    copy = tmp_path / "copy.hdf"
    cases = (
        ([*argv, "--resume", "--fragments", "watershed"], "other options"),
        ([*argv[:1], f"{copy}:affinities", *argv[2:], "--resume"], "other affinities"),
    )
    copy.write_bytes(Path(tiny_volume["path"]).read_bytes())
    before = tree_hash(output)
    for command, expected in cases:
        code, _, err = run(command, capsys)
        assert_one_line(code, err, expected, "expected the same inputs, options and config")
    code = main([*argv, "--resume", "--config", CONFIG, *OPTS, "INFERENCE.MIN_SEGMENT_SIZE", "30"])
    assert_one_line(code, capsys.readouterr().err.strip(), "other options")
    assert tree_hash(output) == before


def test_resume_of_a_finished_output_says_the_chunks_were_not_re_read(tmp_path, tiny_volume, capsys, dask_client):
    output = tmp_path / "seg.zarr"
    argv = ["--affinities", f"{tiny_volume['path']}:affinities", "--output", str(output), *scheduler(dask_client)]
    assert run(argv, capsys)[0] == 0
    chunk = next(path for path in (output / "0").iterdir() if path.name[0].isdigit())  # level 0 of the image group
    chunk.write_bytes(b"garbage")
    code, out, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert "already complete" in out and "the chunks were not re-read: --overwrite recomputes them" in out


def test_check_replaceable_names_what_is_there(tmp_path):
    (tmp_path / "a.zarr").mkdir()
    for index in range(7):
        (tmp_path / "a.zarr" / f"f{index}").write_text("x")
    with pytest.raises(Exception, match=r"holds: f0, f1, f2, f3, f4, \.\.\. \(7 entries\)"):
        check_replaceable(tmp_path / "a.zarr", "--output")
    (tmp_path / "b.zarr").write_text("x")
    with pytest.raises(Exception, match="is a file"):
        check_replaceable(tmp_path / "b.zarr", "--output")
    check_replaceable(tmp_path / "missing.zarr", "--output")  # nothing there: fine
