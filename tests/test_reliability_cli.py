"""Reliability of the evaluation, viewer and synthetic-data CLIs (issue 12, items 3, 5, 8): one-line
errors for bad flags and mixed result files, read-only folders, padding handled alike."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.cli import synthetic
from melecole.cli.evaluate import main as evaluate_main
from melecole.errors import DataError
from melecole.evaluation import evaluate_segmentation
from melecole.visualization import build_viewer_state, render_report

SHAPE = (4, 12, 12)
PADDING = (1, 2, 2)


def _one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    error = capsys.readouterr().err.strip()
    lines = error.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), error
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _view_main():
    spec = importlib.util.spec_from_file_location("view_script", Path(__file__).resolve().parents[1] / "view.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _gt() -> np.ndarray:
    gt = np.zeros(SHAPE, np.int64)
    gt[:, :6, :6], gt[:, :6, 6:], gt[:, 6:, :6], gt[:, 6:, 6:] = 1, 2, 3, 4
    return gt


def _segmentation() -> np.ndarray:
    seg = _gt().astype(np.uint64)
    seg[:, :6, :] = 20  # merges GT 1 and 2
    return seg


def _write(path: Path, attrs: dict | None = None, **datasets: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle[key] = value
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """GT (with padded raw), a segmentation and membranes of one run, membranes of another run."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, np.add(SHAPE, 2 * np.array(PADDING)), dtype=np.uint8)
    probability = (_gt() > 0).astype(np.float32) * 0.9
    run, other = {"fingerprint": "A"}, {"fingerprint": "B"}
    affinities = np.zeros((3,) + SHAPE, np.float16)
    return {
        "gt": _write(tmp_path / "gt.hdf", volume=raw, labels=_gt()),
        "segmentation": _write(tmp_path / "r" / "val_segmentation.hdf", run, segmentation=_segmentation()),
        "membranes": _write(tmp_path / "r" / "val_membranes.hdf", run, membranes=probability),
        "other": _write(tmp_path / "o" / "val_membranes.hdf", other, membranes=probability),
        "affinities": _write(tmp_path / "r" / "val_affinities.hdf", run, affinities=affinities),
    }


# ------------------------------------------------------------------------------------ evaluation


def test_evaluation_refuses_mixed_runs(files: dict, capsys) -> None:
    args = ["--gt", str(files["gt"]), "--segmentation", str(files["segmentation"])]
    assert evaluate_main([*args, "--membranes", str(files["other"])]) == 2
    _one_line_error(
        capsys, "--segmentation", "val_segmentation.hdf", "--membranes", "o/val_membranes.hdf", "fingerprints"
    )
    assert evaluate_main([*args, "--membranes", str(files["membranes"])]) == 0
    assert "CC baseline" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--threshold", "7"], ["--threshold: 7", "expected", "[0, 1]"]),
        (["--threshold", "nan"], ["--threshold: nan"]),
        (["--top", "-3"], ["--top: -3", "expected", ">= 0"]),
    ],
)
def test_evaluation_flag_values(files: dict, capsys, flags: list, fragments: list) -> None:
    assert evaluate_main(["--gt", str(files["gt"]), "--segmentation", str(files["segmentation"]), *flags]) == 2
    _one_line_error(capsys, *fragments)


def test_evaluation_refuses_negative_gt_ids(files: dict, tmp_path: Path, capsys) -> None:
    gt = _gt()
    gt[0, 0, 0] = -3
    bad = _write(tmp_path / "negative.hdf", labels=gt)
    assert evaluate_main(["--gt", str(bad), "--segmentation", str(files["segmentation"])]) == 2
    _one_line_error(capsys, "negative.hdf", "negative ids (smallest -3)", "expected ids >= 0")


def test_scores_are_printed_before_the_histogram_warning(files: dict, tmp_path: Path, capsys, read_only_folder) -> None:
    folder = tmp_path / "ro"
    segmentation = _write(folder / "seg.hdf", segmentation=_segmentation())
    json_path = tmp_path / "scores.json"
    read_only_folder(folder)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert evaluate_main(["--gt", str(files["gt"]), "--segmentation", str(segmentation), "--json", str(json_path)]) == 0
    captured = capsys.readouterr()
    expected = evaluate_segmentation(_segmentation(), _gt())
    assert f"{expected.vi_merge:.4f}" in captured.out and "cell-size histogram" not in captured.out
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "seg_cell_sizes.png" in warnings[0]
    assert "--histogram" in warnings[0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
    assert json.loads(json_path.read_text())["results"]["segmentation"]["vi_merge"] == pytest.approx(expected.vi_merge)


def test_histogram_failure_is_a_warning_even_when_permissions_do_not_apply(files: dict, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    args = ["--gt", str(files["gt"]), "--segmentation", str(files["segmentation"])]
    assert evaluate_main([*args, "--histogram", str(blocker / "h.png")]) == 0
    captured = capsys.readouterr()
    assert "VI split" in captured.out
    assert captured.err.startswith("warning: ") and captured.err.count("\n") == 1 and "h.png" in captured.err
    assert blocker.read_text() == "mine"


# ----------------------------------------------------------------------------------------- view.py


def test_view_refuses_mixed_runs_and_bad_inputs(files: dict, tmp_path: Path, capsys) -> None:
    main = _view_main()
    base = ["--gt", str(files["gt"]), "--segmentation", str(files["segmentation"]), "--png", str(tmp_path / "v.png")]
    assert main([*base, "--membranes", str(files["other"])]) == 2
    _one_line_error(capsys, "--segmentation", "--membranes", "o/val_membranes.hdf", "fingerprints")
    assert main([*base, "--affinities", str(files["affinities"]), "--membranes", str(files["membranes"])]) == 0
    capsys.readouterr()
    four_d = _write(tmp_path / "m4.hdf", membranes=np.zeros((2,) + SHAPE, np.float32))
    assert main([*base, "--membranes", str(four_d)]) == 2
    _one_line_error(capsys, "--membranes", "(2, 4, 12, 12)", "expected a 3D volume (Z, Y, X)")
    (tmp_path / "folder.png").mkdir()
    assert main([*base[:-1], str(tmp_path / "folder.png")]) == 2
    _one_line_error(capsys, "--png", "folder.png", "is a folder")


def test_view_refuses_unusable_server_addresses(files: dict, capsys) -> None:
    main = _view_main()
    base = ["--gt", str(files["gt"]), "--segmentation", str(files["segmentation"])]
    assert main([*base, "--port", "99999"]) == 2
    _one_line_error(capsys, "--port: 99999", "1..65535")
    assert main([*base, "--bind", "999.1.1.1"]) == 2
    _one_line_error(capsys, "--bind", "999.1.1.1", "not a valid address")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([*base, "--port", str(port)]) == 2
    _one_line_error(capsys, "--port", f"127.0.0.1:{port}", "in use")


def test_view_and_evaluation_both_crop_a_padded_segmentation(files: dict, tmp_path: Path, capsys) -> None:
    padded = np.pad(_segmentation(), [(p, p) for p in PADDING], constant_values=99)
    path = _write(tmp_path / "padded.hdf", segmentation=padded)
    assert evaluate_main(["--gt", str(files["gt"]), "--segmentation", str(path)]) == 0
    assert "segmentation center-cropped by (1, 2, 2) per side" in capsys.readouterr().out
    state = build_viewer_state(gt=_gt(), segmentation=padded, resolution=(30, 6, 6))
    np.testing.assert_array_equal(state.layers["segmentation"].source[0].url.data, _segmentation())
    assert tuple(state.layers["gt"].source[0].url.data.shape) == SHAPE
    render_report(tmp_path / "r.png", gt=_gt(), segmentation=padded)
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert _view_main()(["--gt", str(files["gt"]), "--segmentation", str(path), "--png", str(tmp_path / "v.png")]) == 0
    with pytest.raises(DataError, match="same padding on both sides"):
        build_viewer_state(gt=_gt(), segmentation=padded[:, :-1])


# ---------------------------------------------------------------------------------- synthetic data


def test_synthetic_out_and_seed_are_checked_before_generating(tmp_path: Path, capsys, read_only_folder) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    assert synthetic.main(["--out", str(blocker), "--small"]) == 2
    _one_line_error(capsys, "--out", "afile", "is a file, expected a folder")
    assert synthetic.main(["--out", str(tmp_path / "d"), "--seed", "-1", "--small"]) == 2
    _one_line_error(capsys, "--seed: -1", "expected an integer >= 0")
    assert blocker.read_text() == "mine" and not (tmp_path / "d").exists()
    locked = read_only_folder(tmp_path / "locked")
    assert synthetic.main(["--out", str(locked / "d"), "--small"]) == 2
    _one_line_error(capsys, "--out", "locked", "not writable")


def test_synthetic_refuses_to_overwrite_a_dataset(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "d"
    written = []
    monkeypatch.setattr(synthetic, "generate_dataset", lambda out, seed, **kwargs: written.append(seed) or [])
    existing = out / "val" / "synthetic_val_00.hdf"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"someone's data")
    assert synthetic.main(["--out", str(out), "--small"]) == 2
    _one_line_error(capsys, "--out", "a dataset exists", "--overwrite")
    assert existing.read_bytes() == b"someone's data" and written == []
    assert synthetic.main(["--out", str(out), "--small", "--seed", "3", "--overwrite"]) == 0
    assert written == [3]
    assert synthetic.main(["--out", str(tmp_path / "new"), "--small"]) == 0 and written == [3, 0]
