"""view.py and melecole.visualization: viewer state (no server), padding crop, CLI errors, PNG report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from melecole.errors import DataError
from melecole.io import LazyVolume, open_volume
from melecole.utils.cli import run_cli
from melecole.visualization import build_viewer_state, crop_to_labels, open_view_inputs, render_report
from melecole.visualization.report import MERGE_COLOURS, SPLIT_COLOURS, choose_slices, error_map

PADDING = (1, 3, 2)
SHAPE = (4, 6, 5)


def load_view_script(repo_root: Path):
    spec = importlib.util.spec_from_file_location("view_script", repo_root / "view.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def volumes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    padded = tuple(s + 2 * p for s, p in zip(SHAPE, PADDING))
    gt = rng.integers(0, 4, SHAPE).astype(np.uint32)
    return {
        "raw": rng.integers(0, 256, padded, dtype=np.uint8),
        "gt": gt,
        "segmentation": (gt // 2).astype(np.int64),  # signed labels are converted for neuroglancer
        "affinities": rng.random((3,) + SHAPE).astype(np.float16),
        "membranes": rng.random(SHAPE).astype(np.float32),
    }


def source_array(state, name: str):
    """The array a LocalVolume layer serves."""
    return state.layers[name].source[0].url.data


def test_viewer_state_layers_dimensions_and_padding_crop(volumes):
    state = build_viewer_state(**volumes, resolution=(40, 4, 5), padding=PADDING)
    assert [layer.name for layer in state.layers] == ["raw", "gt", "segmentation", "affinities", "membranes"]
    assert state.layers["gt"].type == "segmentation" and state.layers["segmentation"].type == "segmentation"
    assert state.layers["raw"].type == "image" and not state.layers["affinities"].visible
    dimensions = state.dimensions
    assert list(dimensions.names) == ["z", "y", "x"]
    # neuroglancer stores nm as metres
    assert list(dimensions.units) == ["m", "m", "m"]
    np.testing.assert_allclose(np.asarray(dimensions.scales) * 1e9, [40, 4, 5])
    raw = np.asarray(source_array(state, "raw")[:])
    assert raw.shape == SHAPE
    np.testing.assert_array_equal(raw, volumes["raw"][1:-1, 3:-3, 2:-2])
    affinity_source = state.layers["affinities"].source[0].url
    assert list(affinity_source.dimensions.names) == ["c^", "z", "y", "x"]
    assert affinity_source.data_type == "float32" and affinity_source.shape == (3,) + SHAPE
    assert state.layers["segmentation"].source[0].url.data_type == "uint64"
    np.testing.assert_allclose(state.position, np.asarray(SHAPE) / 2)


def test_padding_zero_inferred_and_wrong(volumes):
    unpadded = volumes["raw"][1:-1, 3:-3, 2:-2]
    state = build_viewer_state(raw=unpadded, gt=volumes["gt"], padding=(0, 0, 0))
    np.testing.assert_array_equal(source_array(state, "raw")[:], unpadded)
    inferred = build_viewer_state(raw=volumes["raw"], gt=volumes["gt"])  # padding from the shapes
    np.testing.assert_array_equal(source_array(inferred, "raw")[:], unpadded)
    with pytest.raises(DataError, match="expected spatial shape"):
        build_viewer_state(raw=volumes["raw"], gt=volumes["gt"], padding=(0, 0, 0))
    with pytest.raises(DataError, match="--padding"):
        build_viewer_state(raw=volumes["raw"][:, :-1], gt=volumes["gt"])


def test_crop_to_labels_is_lazy(tmp_path, volumes):
    path = tmp_path / "v.hdf"
    with h5py.File(path, "w") as handle:
        handle["volume"] = volumes["raw"]
    lazy = open_volume(f"{path}:volume")
    cropped = crop_to_labels(lazy, SHAPE, PADDING, "raw")
    assert isinstance(cropped, LazyVolume) and cropped.shape == SHAPE
    np.testing.assert_array_equal(cropped[1, 2:4], volumes["raw"][2, 5:7, 2:-2])


def write_inputs(folder: Path, volumes: dict[str, np.ndarray]) -> dict[str, Path]:
    paths = {"gt": folder / "gt.hdf", "segmentation": folder / "seg.hdf"}
    with h5py.File(paths["gt"], "w") as handle:
        handle["volume"] = volumes["raw"]
        handle["labels"] = volumes["gt"]
    with h5py.File(paths["segmentation"], "w") as handle:
        handle["mws_output"] = volumes["segmentation"]  # the only dataset: used whatever its name
    return paths


def test_open_view_inputs_defaults_and_errors(tmp_path, volumes):
    paths = write_inputs(tmp_path, volumes)
    inputs = open_view_inputs(paths["gt"], paths["segmentation"])
    assert inputs.raw.shape == volumes["raw"].shape  # the GT file's 'volume'
    assert inputs.segmentation.url.endswith(":mws_output") and inputs.affinities is None
    with pytest.raises(DataError, match="--segmentation: file '.*missing.hdf' does not exist"):
        open_view_inputs(paths["gt"], tmp_path / "missing.hdf")
    with pytest.raises(DataError, match="--gt: .*2 datasets"):
        with h5py.File(tmp_path / "two.hdf", "w") as handle:
            handle["a"], handle["b"] = volumes["gt"], volumes["gt"]
        open_view_inputs(tmp_path / "two.hdf")


def test_view_cli_missing_file_is_one_line_error(tmp_path, repo_root, capsys, volumes):
    view = load_view_script(repo_root)
    paths = write_inputs(tmp_path, volumes)
    code = run_cli(view.main)(["--gt", str(paths["gt"]), "--segmentation", str(tmp_path / "nope.hdf")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith("error: --segmentation: file") and "nope.hdf" in error


def test_view_cli_png_report(tmp_path, repo_root, capsys, volumes):
    from PIL import Image

    view = load_view_script(repo_root)
    paths = write_inputs(tmp_path, volumes)
    out = tmp_path / "report" / "montage.png"
    argv = [
        "--gt",
        str(paths["gt"]),
        "--segmentation",
        str(paths["segmentation"]),
        "--png",
        str(out),
        "--slices",
        "0",
        "3",
        "--padding",
        *map(str, PADDING),
    ]
    assert run_cli(view.main)(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width == 1200  # 4 panels of 3 inches at 100 dpi
    assert sorted(p.name for p in out.parent.iterdir()) == ["montage.png"]  # no temporary left
    assert run_cli(view.main)(argv[:-4] + ["--slices", "9"]) == 2  # outside the volume
    assert "--slices [9] outside" in capsys.readouterr().err


def test_error_map_marks_merges_and_splits():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0], [3, 3, 0, 0]])
    segmentation = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [6, 7, 8, 8], [6, 7, 8, 8]])  # 1+2 merged, 3 split
    image = error_map(None, segmentation, gt, merge_labels=[5], split_labels=[3], alpha=1.0)
    np.testing.assert_array_equal(image[0, 0], MERGE_COLOURS[0])
    np.testing.assert_array_equal(image[3, 1], SPLIT_COLOURS[0])
    np.testing.assert_array_equal(image[3, 3], [76, 76, 76])  # GT 0: not evaluated, dimmed grey


def test_choose_slices():
    assert choose_slices(100) == [20, 40, 59, 79]
    assert choose_slices(1) == [0]
    assert choose_slices(10, [3, 7]) == [3, 7]
    with pytest.raises(DataError):
        choose_slices(5, [5])


def test_render_report_without_raw(tmp_path, volumes):
    path = render_report(tmp_path / "r.png", gt=volumes["gt"], segmentation=volumes["segmentation"], top_k=1)
    assert path.stat().st_size > 1000
