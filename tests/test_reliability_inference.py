"""Reliability of reading inputs and writing results (issue 12, items 2, 3, 5, 6, 8): NaN / empty /
unlabelled data, unwritable outputs and full disks, content-hashed cache keys, unique names, stale
temporaries, cloud credentials and relative file:// URLs."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.data.dataset import read_volumes
from melecole.data.volume import read_volume
from melecole.engine.checkpoint import save_checkpoint
from melecole.errors import DataError
from melecole.inference.chunked import predict_affinities_chunked
from melecole.inference.inputs import read_input, resolve_input, volume_jobs
from melecole.inference.outputs import write_hdf
from melecole.inference.pipeline import run_inference
from melecole.inference.stores import check_store_url
from melecole.io import open_volume, parse_volume_url, remove_stale_temporaries, write_volume
from melecole.models import build_model

TINY = [
    "MODEL.INPUT_SIZE", "[8, 32, 32]",
    "MODEL.FILTERS", "[4, 8]",
    "MODEL.POOL_Z", "[False]",
    "MODEL.EMBEDDING_DIMENSION", "4",
    "MODEL.NORM_GROUPS", "2",
    "HARDWARE.DEVICE", "cpu",
    "LOG.PROGRESS_BAR", "False",
]  # fmt: skip
SHAPE = (8, 32, 32)


def _write(path: Path, raw: np.ndarray, labels: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["volume"] = raw
        if labels is not None:
            handle["labels"] = labels
    return path


def _raw(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint32)
    labels[:, : shape[1] // 2] = 1
    labels[:, shape[1] // 2 + 1 :] = 2
    return labels


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    """Tiny config (yaml), checkpoint RUN/checkpoints/last.pt, data root with an empty val split."""
    cfg = load_cfg(None, TINY + ["DATASET.DATA_ROOT", str(tmp_path / "data")])
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=4)
    (tmp_path / "data" / "val").mkdir(parents=True)
    base = ["--config", str(config), "--checkpoint", str(checkpoint)]
    return {"cfg": cfg, "checkpoint": checkpoint, "tmp": tmp_path, "base": base, "out": tmp_path / "run" / "results"}


def _one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    error = capsys.readouterr().err.strip()
    lines = error.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), error
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------- 2. NaN / Inf


def test_infer_refuses_raw_with_one_nan_and_writes_nothing(setup: dict, capsys) -> None:
    import infer

    raw = _raw().astype(np.float32) / 255
    raw[3, 4, 5] = np.nan
    path = _write(setup["tmp"] / "nan.hdf", raw)
    assert infer.main(["--input", str(path), *setup["base"]]) == 2
    _one_line_error(capsys, "nan.hdf", "1 non-finite value (1 NaN, 0 Inf)", "expected finite")
    assert not setup["out"].exists()


def test_training_reader_refuses_non_finite_raw(setup: dict) -> None:
    raw = _raw().astype(np.float64)
    raw[0, 0, :3] = [np.inf, -np.inf, np.nan]
    path = _write(setup["tmp"] / "data" / "train" / "bad.hdf", raw, _labels())
    with pytest.raises(DataError, match=r"bad.hdf.*3 non-finite values \(1 NaN, 2 Inf\)"):
        read_volume(path)
    with pytest.raises(DataError, match="bad.hdf"):
        read_volumes(setup["cfg"], "train")


def test_zarr_input_and_chunked_blocks_refuse_non_finite_raw(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    raw[6, 30, 30] = np.nan  # in the last block only
    write_volume(f"{tmp_path / 'raw.zarr'}:em", raw, chunks=(4, 16, 16))
    source = resolve_input(f"{tmp_path / 'raw.zarr'}:em", None)
    with pytest.raises(DataError, match=r"raw.zarr:em.*1 non-finite value"):
        read_input(source, "labels", (0, 0, 0))

    calls = []

    def predictor(model, block, *, offsets, **kwargs):
        calls.append(block.shape)
        return np.zeros((len(offsets),) + block.shape, np.float32), np.zeros(block.shape, np.float32)

    sink = tmp_path / "out.zarr"
    with pytest.raises(DataError, match=r"raw.zarr:em' block \[\(3, 8\), \(16, 32\), \(16, 32\)\]"):
        predict_affinities_chunked(
            None, open_volume(f"{tmp_path / 'raw.zarr'}:em"), str(sink), offsets=[(-1, 0, 0)], window=(4, 16, 16),
            chunk_shape=(4, 16, 16), halo=(1, 0, 0), predictor=predictor, progress=False,
        )  # fmt: skip
    assert len(calls) == 7  # the blocks before the NaN one were predicted
    assert not sink.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- 6. empty / unlabelled


def test_infer_on_an_empty_volume_names_the_file(setup: dict, capsys) -> None:
    import infer

    path = _write(setup["tmp"] / "empty.hdf", np.zeros((0, 64, 64), np.uint8))
    assert infer.main(["--input", str(path), *setup["base"]]) == 2
    _one_line_error(capsys, "empty.hdf", "(0, 64, 64)", "expected a non-empty")


def test_all_zero_labels_warn_early_when_reading(setup: dict, caplog) -> None:
    path = _write(setup["tmp"] / "data" / "train" / "blank.hdf", _raw(), np.zeros(SHAPE, np.uint32))
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    assert volume.labels is not None and not volume.labels.any()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "blank.hdf" in warnings[0] and "all 0" in warnings[0]


def test_split_goes_on_after_an_all_zero_label_volume(setup: dict, caplog) -> None:
    val = setup["tmp"] / "data" / "val"
    _write(val / "a_blank.hdf", _raw(0), np.zeros(SHAPE, np.uint32))
    _write(val / "b_labelled.hdf", _raw(1), _labels())
    with caplog.at_level(logging.WARNING):
        results = run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)
    assert [r.name for r in results] == ["val_a_blank", "val_b_labelled"]
    assert all(r.segmentation.is_file() and r.membranes.is_file() for r in results)
    assert results[0].scores == {} and set(results[1].scores) == {"segmentation"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "a_blank.hdf" in warnings[0] and "nothing to evaluate" in warnings[0]


# --------------------------------------------------------------------------- 3. unwritable outputs


def test_output_dir_that_is_a_file_fails_before_predicting(setup: dict, capsys, monkeypatch) -> None:
    import infer
    from melecole.inference import pipeline

    _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw())
    monkeypatch.setattr(pipeline, "predict_stored", lambda *a, **k: pytest.fail("predicted before the check"))
    blocker = setup["tmp"] / "afile"
    blocker.write_text("mine")
    assert infer.main(["--split", "val", "--output-dir", str(blocker / "sub"), *setup["base"]]) == 2
    _one_line_error(capsys, "--output-dir", "afile", "is a file, expected a folder")
    assert blocker.read_text() == "mine"


def test_read_only_results_folder_fails_before_predicting(setup: dict, capsys, monkeypatch, read_only_folder) -> None:
    import infer
    from melecole.inference import pipeline

    _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw())
    monkeypatch.setattr(pipeline, "predict_stored", lambda *a, **k: pytest.fail("predicted before the check"))
    locked = read_only_folder(setup["tmp"] / "locked")
    assert infer.main(["--split", "val", "--output-dir", str(locked), *setup["base"]]) == 2
    _one_line_error(capsys, "--output-dir", "locked", "not writable")
    read_only_folder(setup["tmp"] / "run")  # the checkpoint's run folder (the default)
    assert infer.main(["--split", "val", *setup["base"]]) == 2
    _one_line_error(capsys, "results folder", "not writable")


def test_store_outputs_that_cannot_be_written_fail_early(setup: dict, capsys) -> None:
    import infer

    blocker = setup["tmp"] / "afile"
    blocker.write_text("mine")
    with pytest.raises(DataError, match="is a file, expected a folder"):
        check_store_url(f"precomputed://file://{blocker}/layer", "--output-affinities", overwrite=False)
    with pytest.raises(DataError, match="is a file"):
        check_store_url(f"{blocker}/x.zarr", "--output-affinities")
    _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw())
    code = infer.main(["--split", "val", "--output-precomputed", f"precomputed://file://{blocker}", *setup["base"]])
    assert code == 2
    _one_line_error(capsys, "--output-precomputed", "afile")
    assert not setup["out"].exists()


def test_full_disk_gives_one_line_and_removes_the_temporary(setup: dict, monkeypatch) -> None:
    from melecole.io import hdf5_output

    target = setup["tmp"] / "out" / "x.hdf"
    write_hdf(target, {"a": (np.zeros((2, 2, 2)), {})}, {"fingerprint": "old"})

    class FullDisk:
        """The temporary file on a disk that fills up after three writes."""

        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def write(self, data):
            self.writes += 1
            if self.writes > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

    original = hdf5_output._GuardedFile.__init__
    monkeypatch.setattr(hdf5_output._GuardedFile, "__init__", lambda self, handle: original(self, FullDisk(handle)))
    with pytest.raises(DataError, match=r"x.hdf': cannot write \(No space left on device\), expected free disk"):
        write_hdf(target, {"a": (np.random.default_rng(0).random((4, 64, 64)), {})}, {"fingerprint": "new"})
    assert os.listdir(target.parent) == ["x.hdf"]
    with h5py.File(target) as handle:  # the previous file is untouched
        assert handle.attrs["fingerprint"] == "old"


@pytest.mark.slow
def test_file_size_limit_during_infer_exits_2_without_crash(setup: dict, repo_root: Path) -> None:
    _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw(0, (8, 48, 48)))
    command = f"ulimit -f 24; exec {sys.executable} infer.py --split val --no-eval " + " ".join(setup["base"])
    result = subprocess.run(["bash", "-c", command], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]] and "Traceback" not in result.stderr
    assert "val_affinities.hdf" in errors[0] and "File too large" in errors[0]
    assert _files(setup["out"]) in ([], ["last"])  # no temporary, no partial result


# ----------------------------------------------------------------------------- 5. consistency


def test_same_size_replacement_with_restored_mtime_is_detected(setup: dict) -> None:
    path = _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw(0))
    first = run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)[0]
    assert not first.reused
    assert run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)[0].reused
    stat = path.stat()
    with h5py.File(path, "r+") as handle:
        handle["volume"][...] = _raw(1)  # same size, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)[0]
    assert not again.reused


def test_colliding_stems_in_a_split_get_unique_names(setup: dict) -> None:
    val = setup["tmp"] / "data" / "val"
    _write(val / "vol.hdf", _raw(0))
    _write(val / "vol.h5", _raw(1))
    _write(val / "other.hdf", _raw(2))
    jobs = volume_jobs(setup["tmp"] / "data", "val", None, "volume")
    assert [(prefix, Path(source.url).name) for prefix, source in jobs] == [
        ("val_other", "other.hdf"),
        ("val_vol_h5", "vol.h5"),
        ("val_vol_hdf", "vol.hdf"),
    ]
    _write(val / "vol_h5.hdf5", _raw(3))  # vol.h5 -> vol_h5 collides with this stem
    with pytest.raises(DataError, match="would both write val_vol_h5_"):
        volume_jobs(setup["tmp"] / "data", "val", None, "volume")


def test_stale_temporaries_are_removed_at_the_next_start(setup: dict) -> None:
    _write(setup["tmp"] / "data" / "val" / "v.hdf", _raw())
    out = setup["out"] / "last"
    out.mkdir(parents=True)
    old = time.time() - 3600
    stale = [out / ".val_affinities.hdf.k2j4x_9a.tmp", out / ".seg.zarr.tmp-0123abcd", out / ".x.old-89abcdef"]
    stale[0].write_bytes(b"partial")
    stale[1].mkdir()
    (stale[1] / "chunk").write_bytes(b"1")
    stale[2].mkdir()
    kept = [out / ".notes.tmp", out / "mine.tmp", out / ".val_membranes.hdf.abcdefgh.tmp"]
    for path in kept:
        path.write_bytes(b"keep")
    for path in [*stale, *kept, stale[1] / "chunk"]:
        os.utime(path, (old, old))
    young = out / ".val_segmentation.hdf.zzzzzzzz.tmp"  # another run may be writing it right now
    young.write_bytes(b"young")
    busy = out / ".layer.zarr.tmp-aaaaaaaa"  # an old folder still being filled
    (busy / "0").mkdir(parents=True)
    (busy / "0" / "chunk").write_bytes(b"new")
    os.utime(busy, (old, old))
    with open(kept[2], "rb") as handle:  # a live writer holds a lock on its temporary
        fcntl.flock(handle, fcntl.LOCK_EX)
        run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"keep" for path in kept) and young.exists() and busy.exists()
    assert remove_stale_temporaries(out, min_age_s=0.0) == [busy, kept[2], young]


# ----------------------------------------------------------------- 8. URLs and cloud credentials


def test_gs_layer_without_credentials_is_one_line(setup: dict, monkeypatch, capsys, tmp_path: Path) -> None:
    import infer

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUD_VOLUME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cloudvolume/secrets, no gcloud config
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    url = "precomputed://gs://melecole-no-such-bucket/em"
    assert infer.main(["--input", url, *setup["base"]]) == 2
    _one_line_error(capsys, "gs://melecole-no-such-bucket/em", "credentials for gs:// are missing")


def test_relative_file_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"file:// path 'out/layer' is relative .*expected an absolute path"):
        parse_volume_url("precomputed://file://out/layer")
    with pytest.raises(DataError, match="is relative"):
        parse_volume_url("file://out/layer")
    assert parse_volume_url(f"precomputed://file://{tmp_path}/layer").local_path == tmp_path / "layer"
    with pytest.raises(DataError, match="file:// path 'em' is relative"):
        resolve_input("precomputed://file://em", None)
    with pytest.raises(DataError, match="--output-precomputed: volume 'precomputed://file://out/segmentation'"):
        check_store_url("precomputed://file://out", "--output-precomputed", prefix=True)
