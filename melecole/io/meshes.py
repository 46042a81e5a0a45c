"""Neuroglancer precomputed segmentations with meshes (legacy single-resolution mesh format), via CloudVolume.

A mesh layer is one local folder, a precomputed segmentation layer whose ``info`` names a mesh folder::

    <layer>/info                       layer info: uint32 / uint64 compressed_segmentation, "mesh": "mesh",
                                       MeLeCoLe's mark (kind "mesh-segmentation")
    <layer>/<z>_<y>_<x>/<chunk>        the labels (chunk files uncompressed, so any static web server serves them)
    <layer>/mesh/info                  {"@type": "neuroglancer_legacy_mesh"}
    <layer>/mesh/<label>:0             the label's manifest: {"fragments": [...]}
    <layer>/mesh/<label>:0:<block>     one fragment per (label, block): CloudVolume's precomputed mesh encoding
                                       (uint32 vertex count, float32 x y z vertices in nm, uint32 triangles)

Neuroglancer and CloudVolume (``CloudVolume(...).mesh.get(label)``) join a label's fragments. Vertices are in
nm in neuroglancer's frame: voxel (z, y, x) covers [x, x + 1) * rx, ... (see :mod:`melecole.mesh.core`).

The layer is written into a temporary folder beside its final path (:func:`melecole.io.atomic.temporary_name`)
and renamed into place at the end (:func:`commit_mesh_layer`); an existing layer is replaced only with
``overwrite`` and only when MeLeCoLe wrote it (:func:`check_mesh_output`, the rule of
:mod:`melecole.io.ownership`, extended by the entries of a mesh folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.io.atomic import replace_folder
from melecole.io.ownership import check_replaceable, own_attributes
from melecole.io.volumes import parse_volume_url

__all__ = [
    "MESH_DIR",
    "MESH_KIND",
    "MeshLayer",
    "check_mesh_output",
    "commit_mesh_layer",
    "create_mesh_layer",
    "encode_fragment",
    "label_dtype",
    "mesh_labels",
    "mesh_layer_path",
    "read_mesh_layer",
    "write_fragments",
    "write_labels_block",
    "write_manifests",
]

MESH_KIND = "mesh-segmentation"
MESH_DIR = "mesh"
LEGACY_MESH_TYPE = "neuroglancer_legacy_mesh"


@dataclass(frozen=True)
class MeshLayer:
    """A local precomputed segmentation layer that has meshes.

    Attributes:
        folder: the layer folder (holding ``info``).
        mesh_dir: the mesh folder's name inside it.
        shape: (Z, Y, X) of the labels.
        resolution: (z, y, x) voxel size in nm.
    """

    folder: Path
    mesh_dir: str
    shape: tuple[int, int, int]
    resolution: tuple[float, float, float]


def label_dtype(dtype: Any, what: str) -> np.dtype:
    """The stored dtype of a segmentation of ``dtype``: uint64 for 64-bit integers, else uint32.

    Raises:
        DataError: ``dtype`` is not an integer type (float labels, bool masks).
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise DataError(f"{what}: dtype {dtype}, expected integer labels (uint8 .. uint64 or int8 .. int64)")
    return np.dtype(np.uint64) if dtype.itemsize > 4 else np.dtype(np.uint32)


def mesh_layer_path(output: str | os.PathLike) -> Path:
    """The local folder of a mesh output: a path, ``file:///abs`` or ``precomputed://file:///abs`` (absolute).

    Raises:
        DataError: a remote URL (mesh layers are written locally, then copied where they are served).
    """
    text = os.fspath(output)
    if "://" in text:
        parsed = parse_volume_url(text)
        if parsed.format != "precomputed" or not parsed.is_local:
            raise DataError(f"--output '{text}': not a local folder, expected a local folder for the mesh layer")
        return parsed.local_path.absolute()
    return Path(text).expanduser().absolute()


def _layer_info(
    shape: Sequence[int], dtype: np.dtype, resolution: Sequence[float], chunks: Sequence[int], mark: Mapping[str, Any]
) -> dict[str, Any]:
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="segmentation",
        data_type=np.dtype(dtype).name,
        encoding="compressed_segmentation",
        resolution=[float(r) for r in resolution[::-1]],
        voxel_offset=[0, 0, 0],
        volume_size=[int(s) for s in shape[::-1]],
        chunk_size=[int(c) for c in chunks[::-1]],
        compressed_segmentation_block_size=[8, 8, 8],
        mesh=MESH_DIR,
    )
    info.update(own_attributes(MESH_KIND, **mark))
    return info


def create_mesh_layer(
    folder: Path,
    shape: Sequence[int],
    dtype: Any,
    resolution: Sequence[float],
    chunks: Sequence[int],
    mark: Mapping[str, Any] | None = None,
) -> None:
    """Creates an empty mesh layer in ``folder`` (a new temporary folder): ``info`` and ``mesh/info``.

    Args:
        shape, chunks: (Z, Y, X) of the labels and of the storage chunks.
        dtype: uint32 or uint64 (:func:`label_dtype`).
        resolution: (z, y, x) nm.
        mark: recorded with MeLeCoLe's mark in ``info`` (e.g. the input and the options).
    """
    folder.mkdir(parents=True)
    (folder / MESH_DIR).mkdir()
    info = _layer_info(shape, np.dtype(dtype), resolution, chunks, mark or {})
    (folder / "info").write_text(json.dumps(info, indent=2))
    (folder / MESH_DIR / "info").write_text(json.dumps({"@type": LEGACY_MESH_TYPE}))


def write_labels_block(folder: Path, start: Sequence[int], labels: np.ndarray) -> None:
    """Writes (Z, Y, X) ``labels`` at voxel ``start`` (z, y, x) of the layer in ``folder`` (chunk-aligned,
    or ending at the volume border); chunk files are stored uncompressed."""
    from cloudvolume import CloudVolume

    volume = CloudVolume(
        "file://" + str(folder), progress=False, cache=False, compress=False, non_aligned_writes=False
    )
    z, y, x = (int(s) for s in start)
    depth, height, width = labels.shape
    volume[x : x + width, y : y + height, z : z + depth] = np.asarray(labels, dtype=volume.dtype).T[..., None]


def encode_fragment(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """A fragment file: ``vertices`` (N, 3) float32 x y z in nm and ``faces`` (M, 3) vertex indices, in
    CloudVolume's precomputed mesh encoding."""
    from cloudvolume import Mesh

    return Mesh(np.asarray(vertices, np.float32), np.asarray(faces, np.uint32), None).to_precomputed()


def write_fragments(folder: Path, fragments: Mapping[str, bytes]) -> None:
    """Writes fragment files ``{name: encoded}`` into the layer's mesh folder (a temporary layer: the
    whole layer becomes visible only at :func:`commit_mesh_layer`)."""
    for name, data in fragments.items():
        (folder / MESH_DIR / name).write_bytes(data)


def write_manifests(folder: Path, fragments: Mapping[int, Iterable[str]]) -> int:
    """Writes each label's manifest ``<label>:0`` listing its fragments; returns how many were written."""
    for label, names in fragments.items():
        (folder / MESH_DIR / f"{int(label)}:0").write_text(json.dumps({"fragments": sorted(names)}))
    return len(fragments)


def check_mesh_output(path: Path, overwrite: bool, what: str) -> None:
    """An existing ``path`` is refused without ``overwrite``, and with it unless it is a layer that MeLeCoLe
    wrote (:func:`melecole.io.ownership.check_replaceable`, which knows a layer's ``mesh/`` folder).

    Raises:
        DataError: one line, naming the output and what is there (nothing is touched).
    """
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise DataError(f"{what}: '{path}' already exists, expected --overwrite to replace it or a new path")
    check_replaceable(path, what)


def commit_mesh_layer(temporary: Path, final: Path, overwrite: bool, what: str) -> None:
    """Moves the finished layer ``temporary`` to ``final`` (the ownership check is repeated just before)."""
    check_mesh_output(final, overwrite, what)
    replace_folder(temporary, final)


def read_mesh_layer(url: str | os.PathLike) -> MeshLayer | None:
    """The mesh layer at a local precomputed URL or folder (``info`` naming a mesh folder that holds an
    ``info`` of the legacy format); None for anything else (HDF5, zarr, remote, a layer without meshes)."""
    text = os.fspath(url)
    try:
        parsed = parse_volume_url(text)
        folder = parsed.local_path if parsed.format == "precomputed" and parsed.is_local else None
    except DataError:
        folder = None
    if folder is None and "://" not in text and (Path(text) / "info").is_file():
        folder = Path(text)
    if folder is None:
        return None
    try:
        info = json.loads((folder / "info").read_text())
        mesh_dir = info.get("mesh")
        mesh_info = json.loads((folder / str(mesh_dir) / "info").read_text()) if mesh_dir else {}
        scale = info["scales"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(mesh_dir, str) or mesh_info.get("@type", LEGACY_MESH_TYPE) != LEGACY_MESH_TYPE:
        return None
    shape = tuple(int(s) for s in scale["size"][::-1])
    resolution = tuple(float(r) for r in scale["resolution"][::-1])
    return MeshLayer(folder.absolute(), mesh_dir, shape, resolution)  # type: ignore[arg-type]


def mesh_labels(layer: MeshLayer) -> dict[int, int]:
    """{label: bytes of its fragment files} of the labels with a manifest in ``layer``."""
    folder = layer.folder / layer.mesh_dir
    sizes: dict[int, int] = {}
    for entry in os.scandir(folder):
        label, colon, rest = entry.name.partition(":0")
        if not colon or not label.isdigit():
            continue
        sizes.setdefault(int(label), 0)
        if rest.startswith(":") and entry.is_file():
            sizes[int(label)] += entry.stat().st_size
    return sizes
