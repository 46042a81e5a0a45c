"""Meshes of a segmentation, block by block: ``python -m melecole.mesh SEG --output DIR``.

Each block is meshed with zmesh (marching cubes on the voxel centres) after reading one voxel more on its
high side, so the surfaces of neighbouring blocks meet exactly: a block meshes the cells between the centres
of its own voxels and the first voxel of the next block, and no cell is meshed twice. At the volume's border
the block is padded with one voxel of background, so every object is closed there. Each (label, block) gives
one fragment file; a label's manifest lists its fragments and neuroglancer / CloudVolume join them
(:mod:`melecole.io.meshes`: the legacy precomputed mesh format). The labels themselves are stored in the
same layer, so one folder is a complete segmentation layer with meshes.

Vertices are in nm in neuroglancer's frame, where voxel (z, y, x) covers [x, x + 1) * rx etc.: zmesh's
voxel-centre coordinates plus half a voxel. A one-voxel object is an octahedron with its tips on the
voxel's faces, so every vertex of a label lies inside the bounding box of its voxels.

Blocks run on the blockwise dask machinery (:func:`melecole.blockwise.runner.dask_executor`), or in this
process for one worker or one block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from melecole.blockwise.output import absolute_url
from melecole.blockwise.runner import SerialExecutor, dask_executor
from melecole.errors import ConfigError, DataError
from melecole.io import check_writable_folder, iter_blocks, open_volume
from melecole.io.atomic import remove_path, temporary_name
from melecole.io.checks import check_disjoint, is_stale_temporary
from melecole.io.formats.base import Index
from melecole.io.meshes import (
    check_mesh_output,
    commit_mesh_layer,
    create_mesh_layer,
    encode_fragment,
    label_dtype,
    mesh_layer_path,
    write_fragments,
    write_labels_block,
    write_manifests,
)
from melecole.io.ownership import OutputLock
from melecole.utils.progress import progress_bar

__all__ = ["MeshJob", "MeshSummary", "mesh_block", "mesh_block_task", "mesh_segmentation", "storage_chunks"]

logger = logging.getLogger(__name__)

# Storage chunks of the labels: at most this many voxels per axis (and the block must be a multiple).
MAX_CHUNK = 64


@dataclass(frozen=True)
class MeshJob:
    """What every block task needs (plain values: it travels to dask workers).

    Attributes:
        segmentation: absolute URL of the (Z, Y, X) integer labels.
        folder: the temporary layer folder being written.
        shape, block_shape: (Z, Y, X).
        resolution: (z, y, x) nm.
        dtype: stored label dtype name (uint32 | uint64).
        simplify: zmesh's reduction factor (0 = the exact marching-cubes mesh; 10 keeps ~1/10 of the faces).
        max_error: nm a simplified surface may move.
    """

    segmentation: str
    folder: str
    shape: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    resolution: tuple[float, float, float]
    dtype: str
    simplify: int = 0
    max_error: float = 0.0

    @functools.cached_property
    def blocks(self) -> list[Index]:
        return list(iter_blocks(self.shape, self.block_shape))


@dataclass(frozen=True)
class MeshSummary:
    """A finished run: blocks, labels with a mesh, fragment files, bytes of the layer, wall seconds."""

    output: Path
    blocks: int
    labels: int
    fragments: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (
            f"meshes: {self.labels} labels, {self.fragments} fragments from {self.blocks} blocks, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s -> {self.output}"
        )


def storage_chunks(block_shape: Sequence[int]) -> tuple[int, int, int]:
    """Label chunks for ``block_shape`` (Z, Y, X): min(block, 64) per axis.

    Raises:
        ConfigError: a block axis not positive, or above 64 and not a multiple of 64 (blocks write whole chunks).
    """
    block = tuple(int(b) for b in block_shape)
    if len(block) != 3 or min(block) < 1 or any(b > MAX_CHUNK and b % MAX_CHUNK for b in block):
        raise ConfigError(
            f"--block {' '.join(map(str, block))}: expected 3 positive sizes (z y x), each at most {MAX_CHUNK} "
            f"or a multiple of {MAX_CHUNK}"
        )
    return tuple(min(b, MAX_CHUNK) for b in block)  # type: ignore[return-value]


def mesh_block(
    labels: np.ndarray, start: Sequence[int], pad_low: Sequence[bool], pad_high: Sequence[bool],
    resolution: Sequence[float],
    simplify: int = 0,
    max_error: float = 0.0,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Meshes every non-zero label of one block.

    Args:
        labels: (Z, Y, X) unsigned labels of the block plus its one-voxel overlap on the high side.
        start: (z, y, x) voxel of ``labels[0, 0, 0]`` in the volume.
        pad_low, pad_high: per axis, whether that side is the volume's border (closed with background).
        resolution: (z, y, x) nm.
        simplify, max_error: zmesh's reduction factor (0 = none) and the nm a simplified surface may move
            (zmesh keeps the vertices on the block's faces, so neighbouring fragments still meet).

    Returns:
        {label: (vertices (N, 3) float32 x y z in nm, faces (M, 3) uint32)}.
    """
    import zmesh

    padding = [(int(low), int(high)) for low, high in zip(pad_low, pad_high)]
    padded = np.pad(labels, padding) if any(any(p) for p in padding) else labels
    anisotropy = tuple(float(r) for r in resolution[::-1])  # zmesh: axis 0 of its array is x
    mesher = zmesh.Mesher(anisotropy)
    mesher.mesh(padded.T)
    origin = (np.asarray(start[::-1], np.float64) - [p[0] for p in padding[::-1]] + 0.5) * anisotropy
    meshes = {}
    for label in mesher.ids():
        if label == 0:
            continue
        mesh = mesher.get(label, normals=False, reduction_factor=int(simplify), max_error=float(max_error))
        meshes[int(label)] = ((mesh.vertices + origin).astype(np.float32), mesh.faces.astype(np.uint32))
    mesher.clear()
    return meshes


def _read_block(job: MeshJob, block: Index) -> np.ndarray:
    """The block's labels plus one voxel on each high side inside the volume, as the stored dtype.

    Raises:
        DataError: negative labels.
    """
    volume = open_volume(job.segmentation)
    region = tuple(slice(s.start, min(s.stop + 1, size)) for s, size in zip(block, job.shape))
    labels = np.asarray(volume[region])
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise DataError(
            f"{job.segmentation}: negative label {int(labels.min())} in block {[(s.start, s.stop) for s in block]}, "
            "expected labels >= 0"
        )
    return labels.astype(job.dtype, copy=False)


def mesh_block_task(job: MeshJob, index: int) -> dict[int, str]:
    """Block ``index``: writes its labels and one fragment per label into the layer; returns {label: fragment}."""
    block = job.blocks[index]
    labels = _read_block(job, block)
    folder = Path(job.folder)
    inner = labels[tuple(slice(0, s.stop - s.start) for s in block)]
    write_labels_block(folder, [s.start for s in block], inner)
    pad_low = [s.start == 0 for s in block]
    pad_high = [s.stop == size for s, size in zip(block, job.shape)]
    meshes = mesh_block(
        labels, [s.start for s in block], pad_low, pad_high, job.resolution, job.simplify, job.max_error
    )
    names = {label: f"{label}:0:{index}" for label in meshes}
    write_fragments(folder, {names[label]: encode_fragment(*mesh) for label, mesh in meshes.items()})
    return names


def _resolution(volume: Any, given: Sequence[float] | None, what: str) -> tuple[float, float, float]:
    """``given`` (--resolution), else the input's stored voxel size.

    Raises:
        DataError: neither, or not 3 positive values.
    """
    value = given if given is not None else volume.resolution
    if value is None:
        raise DataError(f"{what}: no voxel size in its metadata, expected --resolution Z Y X (nm)")
    value = tuple(float(v) for v in value)
    if len(value) != 3 or not all(np.isfinite(v) and v > 0 for v in value):
        raise DataError(f"{what}: voxel size {list(value)}, expected 3 positive values (z y x, nm)")
    return value  # type: ignore[return-value]


def _open_input(segmentation: str) -> Any:
    try:
        volume = open_volume(segmentation, default_key="segmentation")
    except DataError as error:
        raise DataError(f"SEG: {error}") from None
    if volume.ndim != 3:
        raise DataError(f"SEG '{segmentation}': shape {list(volume.shape)}, expected a (Z, Y, X) segmentation")
    return volume


def _remove_own_temporaries(final: Path) -> None:
    """Removes temporaries of this output that killed runs left (called holding the output's lock)."""
    prefix = f".{final.name}."
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and is_stale_temporary(entry):
            remove_path(entry)


def _run_blocks(job: MeshJob, executor: Any, progress: Any) -> dict[int, list[str]]:
    """Runs every block on ``executor``; returns {label: its fragment names}."""
    fragments: dict[int, list[str]] = {}
    results = executor.map(functools.partial(mesh_block_task, job), range(len(job.blocks)))
    for names in progress_bar(results, total=len(job.blocks), desc="meshes", unit="block", enabled=progress):
        for label, name in names.items():
            fragments.setdefault(label, []).append(name)
    return fragments


def _layer_bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


def mesh_segmentation(
    segmentation: str,
    output: str | os.PathLike,
    *,
    resolution: Sequence[float] | None = None,
    block_shape: Sequence[int] = (64, 256, 256),
    workers: int = 2,
    simplify: int = 0,
    max_error: float | None = None,
    overwrite: bool = False,
    progress: Any = None,
    executor: Any = None,
    report: Callable[[str], None] = print,
) -> MeshSummary:
    """Writes a neuroglancer precomputed segmentation layer with meshes of every label of ``segmentation``.

    Args:
        segmentation: (Z, Y, X) integer labels: ``file.hdf[:key]`` (default key ``segmentation``),
            ``x.zarr[:key]``, ``x.zarr/key`` or a precomputed URL.
        output: the layer folder (a local path or ``file:///abs``); written beside it, renamed at the end.
        resolution: (z, y, x) nm; default the input's stored voxel size.
        block_shape: (Z, Y, X) per task; each axis at most 64 or a multiple of 64.
        workers: dask LocalCluster processes; 1 (or a single block) runs in this process.
        simplify: zmesh's reduction factor (0 = exact marching cubes, ~10x fewer faces at 10).
        max_error: nm a simplified surface may move (default: the largest voxel side).
        overwrite: replace an existing output that MeLeCoLe wrote.
        progress: a bar over blocks (bool or LOG.PROGRESS_BAR setting; None = only on a terminal).
        executor: run blocks on this executor instead (e.g. ``SerialExecutor()``).
        report: where the summary lines go.

    Raises:
        DataError / ConfigError: one line, before any work: an input that is not (Z, Y, X) integer labels,
            no voxel size, an existing output (without ``overwrite``, or not MeLeCoLe's), an output that
            overlaps the input, a bad block shape or worker count.
    """
    start = time.perf_counter()
    final, what = mesh_layer_path(output), f"--output '{output}'"
    job = _plan(segmentation, final, what, resolution, block_shape, simplify, max_error, overwrite)
    if int(workers) < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1")
    with OutputLock(final.parent / f".{final.name}.mesh-lock", what, report):
        _remove_own_temporaries(final)
        job = dataclasses.replace(job, folder=str(temporary_name(final)))
        temporary = Path(job.folder)
        try:
            mark = dict(input=job.segmentation, block_shape=list(job.block_shape), simplify=job.simplify,
                        max_error=job.max_error, complete=True)
            create_mesh_layer(temporary, job.shape, job.dtype, job.resolution, storage_chunks(job.block_shape), mark)
            report(f"meshing {list(job.shape)} in {len(job.blocks)} blocks of {list(job.block_shape)}")
            with contextlib.ExitStack() as stack:
                if executor is None and (int(workers) == 1 or len(job.blocks) == 1):
                    executor = SerialExecutor()
                elif executor is None:
                    executor = stack.enter_context(dask_executor(workers, report=report))
                fragments = _run_blocks(job, executor, progress)
            write_manifests(temporary, fragments)
            size = _layer_bytes(temporary)
            commit_mesh_layer(temporary, final, overwrite, what)
        finally:
            if os.path.lexists(temporary):
                remove_path(temporary)
    summary = MeshSummary(
        final, len(job.blocks), len(fragments), sum(map(len, fragments.values())), size, time.perf_counter() - start
    )
    report(summary.line())
    return summary


def _plan(
    segmentation: str, final: Path, what: str, resolution: Sequence[float] | None, block_shape: Sequence[int],
    simplify: int, max_error: float | None, overwrite: bool,
) -> MeshJob:
    """Every check before any work -> the job (its ``folder`` still unset).

    Raises:
        DataError / ConfigError: see :func:`mesh_segmentation`.
    """
    volume = _open_input(segmentation)
    dtype = label_dtype(volume.dtype, f"SEG '{segmentation}'")
    voxel_size = _resolution(volume, resolution, f"SEG '{segmentation}'")
    storage_chunks(block_shape)
    if int(simplify) < 0 or (max_error is not None and not max_error >= 0):
        raise ConfigError(f"--simplify {simplify} / --max-error {max_error}: expected values >= 0")
    check_disjoint(str(final), {"SEG": segmentation}, what)
    check_writable_folder(final.parent, what)
    check_mesh_output(final, overwrite, what)
    url = absolute_url(volume.url)  # the key found, the path absolute: dask workers may start elsewhere
    error_nm = float(max(voxel_size) if max_error is None else max_error)
    block = tuple(int(b) for b in block_shape)
    return MeshJob(url, "", volume.shape, block, voxel_size, dtype.name, int(simplify), error_nm)  # type: ignore
