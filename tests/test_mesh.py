"""``python -m melecole.mesh``: precomputed segmentations with meshes, read back with CloudVolume.

Meshes are checked against the voxels they come from: every label's mesh is a closed surface (each edge in
exactly two triangles) whose bounding box is exactly its voxels' box (marching cubes on voxel centres puts the
extreme vertices on the outer voxel faces), and meshing in blocks gives the same surface as one block.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from cloudvolume import CloudVolume

from melecole.blockwise.runner import SerialExecutor
from melecole.cli import view
from melecole.cli.mesh import main as mesh_main
from melecole.cli.view import mesh_source, view_resolution
from melecole.errors import ConfigError, DataError
from melecole.io import write_volume
from melecole.io.meshes import check_mesh_output, read_mesh_layer
from melecole.mesh import mesh_segmentation
from melecole.visualization import build_viewer_state

RESOLUTION = (30.0, 6.0, 4.0)
SHAPE = (20, 70, 90)


def make_labels() -> np.ndarray:
    """(20, 70, 90) uint32: a 2 x 3 grid of columns 1..6 (label 1 with a hole), a ball 99, background 0 above."""
    z, y, x = np.indices(SHAPE)
    labels = (1 + (y // 30) * 3 + x // 30).astype(np.uint32)
    labels[(z - 10) ** 2 + (y - 35) ** 2 + ((x - 45) / 1.5) ** 2 < 64] = 99
    labels[:, 60:, :] = 0
    labels[5:9, 5:15, 5:15] = 0  # a hole inside label 1
    return labels


def write_segmentation(path: Path, labels: np.ndarray, resolution: tuple[float, ...] | None = RESOLUTION) -> str:
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("segmentation", data=labels)
        if resolution is not None:
            dataset.attrs["resolution"] = resolution
    return str(path)


def mesh(segmentation: str, output: Path, **options) -> object:
    options = {"block_shape": (8, 32, 32), "executor": SerialExecutor(), "progress": False, "report": lambda _: None,
               **options}
    return mesh_segmentation(segmentation, output, **options)


def edge_use(faces: np.ndarray) -> np.ndarray:
    """How often each undirected edge of ``faces`` (M, 3) is used."""
    ordered = np.sort(faces, axis=1)
    edges = np.concatenate([ordered[:, [0, 1]], ordered[:, [1, 2]], ordered[:, [0, 2]]])
    return np.unique(edges, axis=0, return_counts=True)[1]


def voxel_box(labels: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) corners of ``label``'s voxels in nm, x y z (neuroglancer: voxel i covers [i, i + 1))."""
    where = np.argwhere(labels == label)
    scale = np.asarray(RESOLUTION[::-1])
    return where.min(0)[::-1] * scale, (where.max(0)[::-1] + 1) * scale


@pytest.fixture(scope="module")
def layer(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A mesh layer of :func:`make_labels` in 3 x 3 x 3 blocks (the last ones smaller)."""
    folder = tmp_path_factory.mktemp("mesh")
    labels = make_labels()
    summary = mesh(write_segmentation(folder / "seg.hdf", labels), folder / "meshes")
    assert (summary.blocks, summary.labels) == (27, 7)
    return folder / "meshes", labels


def test_cloudvolume_reads_back_labels_and_closed_meshes_in_the_voxels_box(layer):
    folder, labels = layer
    volume = CloudVolume(f"file://{folder}", progress=False)
    assert volume.resolution.tolist() == list(RESOLUTION[::-1]) and volume.mesh.meta.is_legacy()
    np.testing.assert_array_equal(np.asarray(volume[:, :, :])[..., 0].T, labels)
    for label in [int(v) for v in np.unique(labels) if v]:
        surface = volume.mesh.get(label)
        assert len(surface.vertices) > 100, label
        low, high = voxel_box(labels, label)
        np.testing.assert_allclose(surface.vertices.min(0), low, err_msg=str(label))
        np.testing.assert_allclose(surface.vertices.max(0), high, err_msg=str(label))
        assert set(edge_use(surface.faces)) == {2}, f"label {label}: open or non-manifold edges"
    ball = volume.mesh.get(99)
    assert len(ball.vertices) - len(edge_use(ball.faces)) + len(ball.faces) == 2  # a sphere: Euler characteristic 2
    assert not (folder / "mesh" / "0:0").exists()  # background has no mesh


def test_blocks_give_the_surface_of_one_block(layer, tmp_path: Path):
    folder, labels = layer
    whole = mesh(write_segmentation(tmp_path / "seg.hdf", labels), tmp_path / "whole", block_shape=(64, 128, 128))
    assert whole.blocks == 1 and whole.fragments == 7
    blocks, single = CloudVolume(f"file://{folder}", progress=False), CloudVolume(f"file://{whole.output}")
    for label in (1, 5, 99):
        a, b = blocks.mesh.get(label), single.mesh.get(label)
        assert len(a.faces) == len(b.faces), label
        np.testing.assert_array_equal(np.unique(a.vertices, axis=0), np.unique(b.vertices, axis=0))


def test_simplified_meshes_are_smaller_closed_and_near_the_voxels(tmp_path: Path):
    labels = make_labels()
    segmentation = write_segmentation(tmp_path / "seg.hdf", labels)
    exact = mesh(segmentation, tmp_path / "exact")
    simple = mesh(segmentation, tmp_path / "simple", simplify=10, max_error=6.0)
    assert simple.bytes < exact.bytes / 3
    volume = CloudVolume(f"file://{simple.output}", progress=False)
    for label in (1, 99):
        surface = volume.mesh.get(label)
        low, high = voxel_box(labels, label)
        assert (surface.vertices >= low - 6.0 - 1e-3).all() and (surface.vertices <= high + 6.0 + 1e-3).all()
        assert set(edge_use(surface.faces)) == {2}, label


def test_zarr_input_with_its_resolution_and_the_command_line(tmp_path: Path, capsys):
    labels = make_labels()[:, :40, :40].astype(np.int64)
    write_volume(str(tmp_path / "seg.zarr") + ":labels/s0", labels, resolution=(8.0, 8.0, 8.0),
                 layer_type="segmentation")
    code = mesh_main([str(tmp_path / "seg.zarr/labels/s0"), "--output", str(tmp_path / "out"), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    assert "meshes: 5 labels" in capsys.readouterr().out  # 1, 2, 4, 5 and the ball
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["data_type"] == "uint64" and info["scales"][0]["resolution"] == [8, 8, 8]
    assert info["melecole"]["kind"] == "mesh-segmentation" and info["mesh"] == "mesh"
    volume = CloudVolume(f"file://{tmp_path / 'out'}", progress=False)
    assert volume.mesh.get(1).vertices.max(0).tolist() == [240.0, 240.0, 160.0]  # x, y < 30 and z < 20 voxels of 8 nm
    assert sorted(os.listdir(tmp_path)) == ["out", "seg.zarr"]  # no lock, no temporary left


def run_error(capsys, argv: list[str]) -> str:
    assert mesh_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys):
    labels = make_labels()
    floats = write_segmentation(tmp_path / "float.hdf", labels.astype(np.float32))
    assert "dtype float32, expected integer labels" in run_error(capsys, [floats, "--output", str(tmp_path / "o")])
    bare = write_segmentation(tmp_path / "bare.hdf", labels, resolution=None)
    assert "expected --resolution Z Y X" in run_error(capsys, [bare, "--output", str(tmp_path / "o")])
    with h5py.File(tmp_path / "4d.hdf", "w") as handle:
        handle["segmentation"] = labels[None]
    assert "expected a (Z, Y, X)" in run_error(capsys, [str(tmp_path / "4d.hdf"), "--output", str(tmp_path / "o")])
    negative = write_segmentation(tmp_path / "negative.hdf", labels.astype(np.int32) - 1)
    error = run_error(capsys, [negative, "--output", str(tmp_path / "o"), "--workers", "1"])
    assert "negative label -1" in error and not (tmp_path / "o").exists()
    good = write_segmentation(tmp_path / "good.hdf", labels)
    block = ["--block", "8", "100", "32"]
    assert "--block 8 100 32: expected" in run_error(capsys, [good, "--output", str(tmp_path / "o"), *block])
    missing = [str(tmp_path / "missing.hdf"), "--output", str(tmp_path / "o")]
    assert "missing.hdf' does not exist" in run_error(capsys, missing)
    inside = run_error(capsys, [good, "--output", str(tmp_path / "good.hdf")])
    assert "is the input SEG" in inside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4d.hdf", "bare.hdf", "float.hdf", "good.hdf", "negative.hdf"]


def test_an_existing_output_is_replaced_only_with_overwrite_and_only_when_ours(tmp_path: Path, capsys):
    segmentation = write_segmentation(tmp_path / "seg.hdf", make_labels()[:, :32, :32])
    output = tmp_path / "out"
    assert mesh_main([segmentation, "--output", str(output), "--workers", "1"]) == 0
    first = json.loads((output / "info").read_text())
    assert "already exists, expected --overwrite" in run_error(capsys, [segmentation, "--output", str(output)])
    assert mesh_main([segmentation, "--output", str(output), "--workers", "1", "--overwrite", "--simplify", "5"]) == 0
    assert json.loads((output / "info").read_text())["melecole"]["simplify"] == 5 != first["melecole"]["simplify"]
    (output / "mesh" / "notes.txt").write_text("mine")
    error = run_error(capsys, [segmentation, "--output", str(output), "--overwrite"])
    assert "entries MeLeCoLe did not write (mesh/notes.txt)" in error and (output / "mesh" / "notes.txt").exists()
    users = tmp_path / "users"
    users.mkdir()
    (users / "info").write_text("{}")
    error = run_error(capsys, [segmentation, "--output", str(users), "--overwrite"])
    assert "was not written by MeLeCoLe" in error and (users / "info").read_text() == "{}"
    with pytest.raises(DataError, match="is a file"):
        check_mesh_output(tmp_path / "seg.hdf", True, "--output")


def test_block_and_worker_checks_come_before_any_work(tmp_path: Path):
    segmentation = write_segmentation(tmp_path / "seg.hdf", make_labels())
    with pytest.raises(ConfigError, match="--workers 0"):
        mesh_segmentation(segmentation, tmp_path / "o", workers=0)
    with pytest.raises(ConfigError, match="--simplify -1"):
        mesh_segmentation(segmentation, tmp_path / "o", simplify=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.hdf"]


@pytest.mark.slow
def test_dask_workers_write_the_same_layer_as_this_process(layer, tmp_path: Path):
    folder, labels = layer
    segmentation = write_segmentation(tmp_path / "seg.hdf", labels)
    summary = mesh_segmentation(segmentation, tmp_path / "dask", block_shape=(8, 32, 32), workers=2, progress=False)
    assert (summary.blocks, summary.labels, summary.fragments) == (27, 7, len(list((folder / "mesh").glob("*:0:*"))))
    for path in sorted((folder / "mesh").iterdir()):
        assert (tmp_path / "dask" / "mesh" / path.name).read_bytes() == path.read_bytes(), path.name
    volume = CloudVolume(f"file://{summary.output}", progress=False)
    np.testing.assert_array_equal(np.asarray(volume[:, :, :])[..., 0].T, labels)


def test_view_serves_the_mesh_layer_with_its_largest_segments_selected(layer):
    folder, labels = layer
    found = read_mesh_layer(str(folder))
    assert found is not None and found.shape == SHAPE and found.resolution == RESOLUTION
    assert read_mesh_layer(f"precomputed://file://{folder}") == found
    assert view_resolution(None, found) == RESOLUTION and view_resolution(None, None) == (30.0, 6.0, 6.0)
    with pytest.raises(DataError, match="voxel size 30 6 4 nm"):
        view_resolution([30.0, 6.0, 6.0], found)
    source, segments = mesh_source(found, "127.0.0.1")
    try:
        assert source.startswith("precomputed://http://127.0.0.1:") and len(segments) == 7
        sizes = {label: sum(p.stat().st_size for p in (folder / "mesh").glob(f"{label}:0:*")) for label in segments}
        assert sorted(segments) == [1, 2, 3, 4, 5, 6, 99]
        assert [sizes[label] for label in segments] == sorted(sizes.values(), reverse=True)
        with urllib.request.urlopen(source[len("precomputed://"):] + "/mesh/99:0") as response:
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert json.load(response)["fragments"] == sorted(p.name for p in (folder / "mesh").glob("99:0:*"))
    finally:
        view.mesh_server.stop()
    state = build_viewer_state(gt=labels, segmentation=labels, segmentation_source=source, segments=segments,
                               resolution=RESOLUTION)
    assert state.layers["segmentation"].source[0].url == source
    assert sorted(state.layers["segmentation"].segments) == sorted(segments)
    with pytest.raises(DataError, match="without a crop"):
        build_viewer_state(gt=labels[1:-1], segmentation=labels, segmentation_source=source, resolution=RESOLUTION)
