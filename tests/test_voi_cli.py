"""variation_of_information.py end to end on tiny HDF5 volumes in a temporary directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.evaluation import connected_components_baseline, evaluate_segmentation

PADDING = (1, 2, 2)


def _run(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(repo_root / "variation_of_information.py"), *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, object]:
    """GT file (raw padded like SNEMI3D), a padded segmentation with one unnamed dataset, membranes."""
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 12, 12), dtype=np.uint64)
    gt[:, :6, :6], gt[:, :6, 6:], gt[:, 6:, :6], gt[:, 6:, 6:] = 1, 2, 3, 4
    gt[:, 6, :] = 0  # a boundary row
    seg = gt.copy()
    seg[:, :6, :] = 20  # merges GT 1 and 2
    seg[2:, 6:, :6] = 30  # splits GT 3
    probability = (gt > 0).astype(np.float32) * 0.9
    paths = {name: tmp_path / f"{name}.hdf" for name in ("gt", "seg", "membranes")}
    with h5py.File(paths["gt"], "w") as handle:
        handle["volume"] = rng.integers(0, 255, np.add(gt.shape, 2 * np.array(PADDING)), dtype=np.uint8)
        handle["labels"] = gt
    with h5py.File(paths["seg"], "w") as handle:
        handle["prediction"] = np.pad(seg, [(p, p) for p in PADDING], constant_values=99)
    with h5py.File(paths["membranes"], "w") as handle:
        handle["membranes"] = (probability * 255).astype(np.uint8)
    return {"paths": paths, "gt": gt, "seg": seg, "probability": probability}


def test_cli_prints_table_and_writes_json_and_png(repo_root: Path, volumes: dict, tmp_path: Path) -> None:
    paths = volumes["paths"]
    out = tmp_path / "scores.json"
    result = _run(
        repo_root,
        "--gt", str(paths["gt"]),
        "--segmentation", str(paths["seg"]),
        "--membranes", str(paths["membranes"]),
        "--json", str(out),
        "--top", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for fragment in ("VI split", "VI merge", "ARAND", "#GT", "#seg", "CC baseline", "offenders", "bits"):
        assert fragment in text
    assert "center-cropped by (1, 2, 2)" in text
    expected = evaluate_segmentation(volumes["seg"], volumes["gt"])
    data = json.loads(out.read_text())
    scores = data["results"]["segmentation"]
    assert scores["vi_split"] == pytest.approx(expected.vi_split) and scores["vi_split"] > 0
    assert scores["vi_merge"] == pytest.approx(expected.vi_merge) and scores["vi_merge"] > 0
    assert scores["arand"] == pytest.approx(expected.arand)
    assert scores["merge_offenders"][0]["label"] == 20 and scores["split_offenders"][0]["label"] == 3
    baseline = evaluate_segmentation(connected_components_baseline(volumes["probability"]), volumes["gt"])
    baseline_scores = data["results"]["CC baseline (p > 0.5)"]
    assert baseline_scores["vi_total"] == pytest.approx(baseline.vi_total)
    assert data["inputs"]["segmentation_key"] == "prediction"
    assert data["inputs"]["segmentation_crop_per_side"] == list(PADDING)
    histogram = tmp_path / "seg_cell_sizes.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_nats_and_compat_original(repo_root: Path, volumes: dict, tmp_path: Path) -> None:
    paths = volumes["paths"]
    for flag, expected in (
        ("--nats", evaluate_segmentation(volumes["seg"], volumes["gt"], log_base=math.e)),
        ("--compat-original", evaluate_segmentation(volumes["seg"], volumes["gt"], compat_original=True)),
    ):
        out = tmp_path / f"{flag}.json"
        args = ["--gt", str(paths["gt"]), "--segmentation", str(paths["seg"]), "--json", str(out), flag]
        result = _run(repo_root, *args)
        assert result.returncode == 0, result.stderr
        assert "nats" in result.stdout
        scores = json.loads(out.read_text())["results"]["segmentation"]
        assert scores["vi_total"] == pytest.approx(expected.vi_total)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_bad_key_lists_the_datasets(repo_root: Path, volumes: dict) -> None:
    paths = volumes["paths"]
    args = ["--gt", str(paths["gt"]), "--segmentation", str(paths["seg"]), "--gt-key", "nope"]
    result = _run(repo_root, *args)
    _assert_one_line_error(result, "nope", "labels", "volume", "--gt-key")


def test_cli_shape_mismatch_and_missing_file(repo_root: Path, volumes: dict, tmp_path: Path) -> None:
    paths = volumes["paths"]
    odd = tmp_path / "odd.hdf"
    with h5py.File(odd, "w") as handle:
        handle["segmentation"] = np.ones((4, 12, 13), dtype=np.uint32)
    result = _run(repo_root, "--gt", str(paths["gt"]), "--segmentation", str(odd))
    _assert_one_line_error(result, "(4, 12, 13)", "(4, 12, 12)", "odd.hdf")
    result = _run(repo_root, "--gt", str(tmp_path / "missing.hdf"), "--segmentation", str(odd))
    _assert_one_line_error(result, "missing.hdf")


def test_a_zarr_segmentation_scores_like_the_same_labels_in_hdf5(volumes: dict, tmp_path: Path) -> None:
    """The blockwise output is an OME-Zarr label image: variation_of_information.py reads it (folder or
    folder:key) and scores exactly what the same labels give from HDF5."""
    from melecole.evaluation.report import evaluate_files
    from melecole.io import create_volume

    seg = np.pad(volumes["seg"], [(p, p) for p in PADDING], constant_values=99).astype(np.uint64)
    writer = create_volume(tmp_path / "seg.zarr", seg.shape, np.uint64, layer_type="segmentation")
    writer.write((slice(0, seg.shape[0]), slice(0, seg.shape[1]), slice(0, seg.shape[2])), seg)
    writer.commit()
    from_hdf5 = evaluate_files(volumes["paths"]["gt"], volumes["paths"]["seg"], top_k=0)
    from_zarr = evaluate_files(volumes["paths"]["gt"], tmp_path / "seg.zarr", top_k=0)
    zarr_scores, hdf5_scores = from_zarr.results[0].scores, from_hdf5.results[0].scores
    assert zarr_scores.vi_split == hdf5_scores.vi_split > 0
    assert zarr_scores.vi_merge == hdf5_scores.vi_merge > 0
    assert zarr_scores.arand == hdf5_scores.arand
