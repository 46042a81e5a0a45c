"""infer.py / run_inference end to end on a tiny model and volume: outputs, cache, errors, atomicity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.engine.checkpoint import save_checkpoint
from melecole.inference.options import resolve_windows
from melecole.inference.outputs import segmentation_key, write_hdf
from melecole.inference.pipeline import run_inference
from melecole.models import build_model

TINY = [
    "MODEL.INPUT_SIZE",
    "[8, 32, 32]",
    "MODEL.FILTERS",
    "[8, 16]",
    "MODEL.POOL_Z",
    "[False]",
    "MODEL.EMBEDDING_DIMENSION",
    "4",
    "HARDWARE.DEVICE",
    "cpu",
    "DATASET.PADDING",
    "[2, 4, 4]",
    "LOG.PROGRESS_BAR",
    "False",
]
LABEL_SHAPE = (10, 40, 36)


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    """Tiny config yaml, a checkpoint in RUN/checkpoints/last.pt and one padded val volume."""
    cfg = load_cfg(None, TINY + ["DATASET.DATA_ROOT", str(tmp_path / "data")])
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(cfg.dump())
    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=7)
    labels = np.zeros(LABEL_SHAPE, dtype=np.uint32)
    labels[:, :20] = 1
    labels[:, 20:] = 2
    raw = np.random.default_rng(0).integers(0, 256, (14, 48, 44)).astype(np.uint8)
    (tmp_path / "data" / "val").mkdir(parents=True)
    with h5py.File(tmp_path / "data" / "val" / "AC3_val.hdf", "w") as handle:
        handle["volume"] = raw
        handle["labels"] = labels
    return {"cfg": cfg, "config": config_path, "checkpoint": checkpoint, "tmp": tmp_path}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "infer.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_outputs_cache_and_thresholds(setup: dict, capsys: pytest.CaptureFixture) -> None:
    import infer

    args = [
        "--split",
        "val",
        "--config",
        str(setup["config"]),
        "--checkpoint",
        str(setup["checkpoint"]),
        "--thresholds",
        "0.3",
        "0.7",
    ]
    assert infer.main(args) == 0
    out_dir = setup["tmp"] / "run" / "results" / "last"
    printed = capsys.readouterr().out
    assert "val: computed" in printed and str(out_dir / "val_segmentation.hdf") in printed
    with h5py.File(out_dir / "val_affinities.hdf") as handle:
        affinities = handle["affinities"]
        assert affinities.shape == (12,) + LABEL_SHAPE and affinities.dtype == np.float16
        assert affinities.compression is None  # probabilities are stored uncompressed: fast block reads
        fingerprint = handle.attrs["fingerprint"]
    with h5py.File(out_dir / "val_membranes.hdf") as handle:
        assert handle["membranes"].shape == LABEL_SHAPE and handle["membranes"].dtype == np.float16
    with h5py.File(out_dir / "val_segmentation.hdf") as handle:
        assert set(handle) == {"segmentation", "segmentation_t0.30", "segmentation_t0.70"}
        assert handle["segmentation"].dtype == np.uint64 and handle["segmentation"].shape == LABEL_SHAPE
        assert handle["segmentation_t0.70"].attrs["background_threshold"] == pytest.approx(0.7)
        first_segmentation = handle["segmentation"][()]
    mtime = (out_dir / "val_affinities.hdf").stat().st_mtime_ns

    # Second run: affinities/foreground reused (files untouched), MWS redone with the same result.
    assert infer.main(args[:6]) == 0
    assert "val: reused cached affinities" in capsys.readouterr().out
    assert (out_dir / "val_affinities.hdf").stat().st_mtime_ns == mtime
    with h5py.File(out_dir / "val_segmentation.hdf") as handle:
        assert set(handle) == {"segmentation"}
        assert np.array_equal(handle["segmentation"][()], first_segmentation)

    # A config change that affects predictions invalidates the cache.
    results = run_inference(
        load_cfg(setup["config"], ["INFERENCE.BLENDING", "constant"]),
        setup["checkpoint"],
        split="val",
        progress=False,
    )
    assert not results[0].reused
    with h5py.File(out_dir / "val_affinities.hdf") as handle:
        assert handle.attrs["fingerprint"] != fingerprint
    # ... and --overwrite forces a recomputation.
    results = run_inference(
        load_cfg(setup["config"], ["INFERENCE.BLENDING", "constant"]),
        setup["checkpoint"],
        split="val",
        overwrite=True,
        progress=False,
    )
    assert not results[0].reused


def test_second_checkpoint_does_not_reuse_results(setup: dict) -> None:
    cfg, checkpoint = setup["cfg"], setup["checkpoint"]
    first = run_inference(cfg, checkpoint, split="val", progress=False)[0]
    assert not first.reused and first.scores  # labels present: VI/ARAND summary
    assert run_inference(cfg, checkpoint, split="val", progress=False)[0].reused
    # Another checkpoint in the same run: its own results folder.
    torch.manual_seed(1)
    other = checkpoint.parent / "iter_9.pt"
    save_checkpoint(other, model=build_model(cfg), cfg=cfg, iteration=9)
    second = run_inference(cfg, other, split="val", progress=False)[0]
    assert not second.reused and second.affinities.parent.name == "iter_9"
    # Same file name, new weights (last.pt rewritten): the content fingerprint differs.
    save_checkpoint(checkpoint, model=build_model(cfg), cfg=cfg, iteration=7)
    assert not run_inference(cfg, checkpoint, split="val", progress=False)[0].reused


def test_input_file_raw_key_and_output_dir(setup: dict) -> None:
    source = setup["tmp"] / "data" / "val" / "AC3_val.hdf"
    single = setup["tmp"] / "single.h5"
    with h5py.File(source) as handle, h5py.File(single, "w") as out:
        out["raw"] = handle["volume"][:, :40, :36]  # unlabelled, unpadded
    results = run_inference(
        setup["cfg"],
        setup["checkpoint"],
        input_path=single,
        raw_key="raw",
        output_dir=setup["tmp"] / "elsewhere",
        progress=False,
    )
    assert results[0].segmentation == setup["tmp"] / "elsewhere" / "results" / "last" / "single_segmentation.hdf"
    with h5py.File(results[0].segmentation) as handle:
        assert handle["segmentation"].shape == (14, 40, 36)
    assert results[0].scores == {}


def test_several_volumes_in_a_split_get_their_stem(setup: dict) -> None:
    folder = setup["tmp"] / "data" / "val"
    (folder / "second.hdf").write_bytes((folder / "AC3_val.hdf").read_bytes())
    results = run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False, evaluate=False)
    assert [r.segmentation.name for r in results] == [
        "val_AC3_val_segmentation.hdf",
        "val_second_segmentation.hdf",
    ]


def test_interrupted_write_leaves_no_partial_file(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    target = setup["tmp"] / "out.hdf"
    write_hdf(target, {"a": (np.zeros((2, 2, 2)), {})}, {"fingerprint": "old"})

    class Boom:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_hdf(target, {"a": (np.ones((2, 2, 2)), {}), "b": (Boom(), {})}, {"fingerprint": "new"})
    with h5py.File(target) as handle:  # previous file intact
        assert handle.attrs["fingerprint"] == "old" and set(handle) == {"a"}
    assert not list(setup["tmp"].glob(".*.tmp"))

    # Inside a real run: the membranes write fails after the affinities file was written.
    original = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):
        if name == "membranes":
            raise KeyboardInterrupt
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(KeyboardInterrupt):
        run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)
    out_dir = setup["tmp"] / "run" / "results" / "last"
    assert (out_dir / "val_affinities.hdf").is_file()
    assert not (out_dir / "val_membranes.hdf").exists() and not list(out_dir.glob(".*"))
    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    result = run_inference(setup["cfg"], setup["checkpoint"], split="val", progress=False)[0]
    assert not result.reused and result.membranes.is_file()


def test_resolve_windows(setup: dict) -> None:
    assert resolve_windows(setup["cfg"]) == ([8, 32, 32], [4, 16, 16], [1, 4, 4])
    # Auto stride is lowered to keep every pair inside one cropped window.
    cfg = load_cfg(None, TINY + ["INFERENCE.MARGIN", "[1, 8, 8]"])
    assert resolve_windows(cfg)[1] == [4, 11, 11]
    from melecole.errors import ConfigError

    with pytest.raises(ConfigError, match="INFERENCE.STRIDE"):
        resolve_windows(load_cfg(None, TINY + ["INFERENCE.STRIDE", "[4, 30, 16]"]))
    with pytest.raises(ConfigError, match="divisible"):
        resolve_windows(load_cfg(None, TINY + ["INFERENCE.WINDOW_SIZE", "[8, 31, 32]"]))
    assert segmentation_key(0.3) == "segmentation_t0.30"


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_code_2(setup: dict, capfd: pytest.CaptureFixture) -> None:
    import infer  # in this process: the script path itself runs in test_cli_end_to_end_subprocess

    config, checkpoint = str(setup["config"]), str(setup["checkpoint"])
    cases = (
        (["--checkpoint", str(setup["tmp"] / "nope.pt")], ["nope.pt", "not found"]),
        (["--checkpoint", checkpoint, "MODEL.EMBEDDING_DIMENSION", "6"], ["MODEL.EMBEDDING_DIMENSION", "4", "6"]),
        (["--checkpoint", checkpoint, "--split", "test"], ["test", "does not exist"]),
    )
    for extra, words in cases:
        split = [] if "--split" in extra else ["--split", "val"]
        code = infer.main([*split, "--config", config, *extra])
        stderr = capfd.readouterr().err
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr
        assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
def test_cli_end_to_end_subprocess(setup: dict, repo_root: Path) -> None:
    result = _cli(
        "--split",
        "val",
        "--config",
        str(setup["config"]),
        "--checkpoint",
        str(setup["checkpoint"]),
        "--no-eval",
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    assert "val_affinities.hdf" in result.stdout and "val_membranes.hdf" in result.stdout
