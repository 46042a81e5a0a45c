"""Block tasks on files: read inputs, call the numpy block functions, write outputs, mark done.

Nothing here knows dask: each task is a plain function ``task(job, block_index)`` that any engine
can call in any process, in any order, any number of times (a rerun rewrites the same result).
A block counts as done only when its marker exists, and the marker is written (atomically) after
the block's outputs were completely written.

Every failure is one line (:class:`melecole.errors.DataError`), raised before the block is marked:
inputs holding NaN / Inf or floats outside [0, 1] (checked as each block is read), a write that fails
(full disk, quota, file size limit; its temporary is removed) and a work file that cannot be read back
(a damaged work folder: ``--overwrite`` starts over).

Work folder (beside the output, removed after the output is committed)::

    manifest.json       inputs, shape and options (a resumed run must match them)
    fragments.zarr      uint64 global fragment ids, chunks = BLOCKWISE.OUTPUT_CHUNKS
    graph/<i>.npz       block i's edges (RegionGraph) and fragment sizes
    lookup.npz          fragment -> segment table (LookupTable)
    segmentation.zarr   the output, chunks = BLOCKWISE.OUTPUT_CHUNKS; renamed into place at the end
    done/<pass>/<i>     markers: fragments, graph, agglomerate (i = 0), relabel
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from melecole.blockwise.plan import BlockPlan, BlockwiseOptions
from melecole.blockwise.segment import agglomerate_blocks, block_fill_heightmap, fragments_of_block, graph_of_block
from melecole.errors import DataError, MeLeCoLeError
from melecole.io import ensure_work_array as io_ensure_work_array
from melecole.io import format_modules, open_work_array
from melecole.io.atomic import temporary_name
from melecole.io.checks import output_error
from melecole.io.volumes import LazyVolume, open_volume
from melecole.segmentation.agglomeration import LookupTable
from melecole.segmentation.fragments import fragment_algorithm
from melecole.segmentation.region_graph import RegionGraph
from melecole.segmentation.relabel import relabel_block

__all__ = [
    "BlockwiseJob",
    "prepare_workdir",
    "is_done",
    "mark_done",
    "atomic_write_bytes",
    "read_manifest",
    "ensure_work_array",
    "json_safe",
    "check_block_values",
    "worker_memory_bytes",
    "fragments_task",
    "graph_task",
    "agglomerate_task",
    "relabel_task",
    "BLOCK_PASSES",
    "import_block_functions",
]

BLOCK_PASSES = ("fragments", "graph", "relabel")

# What the block functions import on first use (C++ extensions, stores): ~0.2 s that the first block of
# every worker would pay, in each run's critical path.
LAZY_IMPORTS = (*format_modules("zarr", "hdf5"), "bioimage_cpp.segmentation", "bioimage_cpp.graph.mutex_watershed")


@dataclass(frozen=True)
class BlockwiseJob:
    """One blockwise run: inputs, volume shape, options and the work folder (picklable).

    Attributes:
        affinities_url: (C, Z, Y, X) affinities, float in [0, 1] or uint8 round(255 a).
        foreground_url: optional (Z, Y, X) foreground probability.
        workdir: work folder (see the module docstring).
        shape: (Z, Y, X) of the volume.
        options: :class:`BlockwiseOptions`.
        resolution: (z, y, x) nm written into the output attributes.
    """

    affinities_url: str
    foreground_url: str | None
    workdir: str
    shape: tuple[int, int, int]
    options: BlockwiseOptions
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def plan(self) -> BlockPlan:
        return BlockPlan(self.shape, self.options.block_shape)

    @property
    def path(self) -> Path:
        return Path(self.workdir)

    @property
    def output_path(self) -> Path:
        return self.path / "segmentation.zarr"

    def manifest(self) -> dict[str, Any]:
        return {
            "affinities": self.affinities_url,
            "foreground": self.foreground_url,
            "shape": list(self.shape),
            "options": self.options.to_dict(),
        }


# ---------------------------------------------------------------------------------- bookkeeping


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _write_error(path: Path, error: OSError, temporary: bool = True) -> DataError:
    """One line for a failed work-folder write: what and why (full disk, quota, file size limit,
    permission), and that the run can be continued."""
    message = str(output_error(path, error))
    if not temporary:
        message = message.replace("; the temporary file was removed", "")
    return DataError(f"{message}; the block is not marked done, run the same command with --resume to continue")


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write (zipfile may raise another error while closing after it)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return error


def _save_atomically(path: Path, save: Callable[[Any], Any], *, binary_file: bool = False) -> None:
    """``save(temporary)`` then a rename onto ``path`` (temporary: :func:`melecole.io.atomic.temporary_name`);
    on failure the temporary is removed and a failed write (OSError) becomes a one-line DataError.
    ``binary_file``: ``save`` gets the temporary opened for writing (np.savez appends .npz to a name)."""
    temporary = temporary_name(path)
    try:
        if binary_file:
            with open(temporary, "wb") as handle:
                save(handle)
        else:
            save(temporary)
        os.replace(temporary, path)
    except Exception as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            raise
        raise _write_error(path, cause) from error


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary beside ``path`` and renames it (one-line DataError on failure)."""
    _save_atomically(path, lambda temporary: temporary.write_bytes(data))


def _marker(job: BlockwiseJob, name: str, index: int) -> Path:
    return job.path / "done" / name / str(index)


def is_done(job: BlockwiseJob, name: str, index: int) -> bool:
    """True when block ``index`` of pass ``name`` finished writing its outputs."""
    return _marker(job, name, index).is_file()


def mark_done(job: BlockwiseJob, name: str, index: int) -> None:
    atomic_write_bytes(_marker(job, name, index), b"done\n")


def prepare_workdir(job: BlockwiseJob) -> None:
    """Creates the work folder, its stores and the manifest (existing ones are kept, for resume).

    Raises:
        DataError: a folder or array cannot be created (full disk, permission).
    """
    try:
        for name in BLOCK_PASSES + ("agglomerate",):
            (job.path / "done" / name).mkdir(parents=True, exist_ok=True)
        (job.path / "graph").mkdir(exist_ok=True)
    except OSError as error:
        raise _write_error(job.path, error, temporary=False) from error
    # Output-sized chunks (blocks are whole numbers of them): halo reads decode little beyond the box.
    chunks = job.options.output_chunks
    ensure_work_array(job.path / "fragments.zarr", job.shape, chunks, np.uint64, job.resolution)
    ensure_work_array(job.output_path, job.shape, chunks, np.uint64, job.resolution, layer_type="segmentation")
    manifest = job.path / "manifest.json"
    if not manifest.is_file():
        atomic_write_bytes(manifest, json.dumps(job.manifest(), indent=1).encode())


def ensure_work_array(
    path: str | os.PathLike, shape: Sequence[int], chunks: Sequence[int], dtype: Any,
    resolution: Sequence[float], **attrs: Any,
) -> None:
    """Creates a zarr (v2) array of a work folder, zero-filled, with the volume attributes; an array that
    exists already (a resumed run) is kept (:func:`melecole.io.ensure_work_array`)."""
    try:
        io_ensure_work_array(path, shape, chunks, dtype, resolution, **attrs)
    except OSError as error:
        raise _write_error(Path(path), error, temporary=False) from error


def json_safe(value: Any) -> Any:
    """Tuples -> lists, recursively (a manifest read back from json compares equal)."""
    return json.loads(json.dumps(value))


def read_manifest(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a work folder, or None when there is none (one-line DataError when unreadable)."""
    path = Path(workdir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from error


def _damaged(path: Path, error: BaseException) -> DataError:
    return DataError(
        f"{path}: cannot read ({_reason(error)}), expected the work files of an interrupted run: the work folder "
        "is damaged, --overwrite starts over"
    )


@functools.lru_cache(maxsize=8)
def _open(url: str) -> LazyVolume:
    return open_volume(url)


def _open_array(path: Path) -> Any:
    return open_work_array(path)


def _box_text(box: Sequence[slice]) -> str:
    return ", ".join(f"{axis} {s.start}:{s.stop}" for axis, s in zip("zyx", box))


def check_block_values(values: np.ndarray, url: str, index: int, box: Sequence[slice], read: Sequence[slice]) -> None:
    """Refuses a block of stored probabilities with NaN / Inf or values outside [0, 1] (uint8, stored as
    round(255 p), is always valid).

    Args:
        values: (C, Z, Y, X) affinities or (Z, Y, X) foreground as stored, read over ``read``.
        url: the input (named in the message).
        index, box: the block and its (z, y, x) slices.
        read: the (z, y, x) slices read (the box, or the box and its halo).

    Raises:
        DataError: one line with the input, the block, the count of bad values and where the first is.
    """
    if values.dtype in (np.uint8, np.bool_) or values.size == 0:
        return
    with np.errstate(invalid="ignore"):
        if values.min() >= 0 and values.max() <= 1:  # a NaN fails both comparisons
            return
        bad = ~((values >= 0) & (values <= 1))
    inexact = np.issubdtype(values.dtype, np.inexact)
    nan = int(np.count_nonzero(np.isnan(values))) if inexact else 0
    inf = int(np.count_nonzero(np.isinf(values))) if inexact else 0
    count = int(np.count_nonzero(bad))
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape)]
    position = [p + s.start for p, s in zip(first[-3:], read)]
    where = (f"c {first[0]} " if values.ndim == 4 else "") + " ".join(f"{a} {p}" for a, p in zip("zyx", position))
    halo = ", with its halo" if tuple(read) != tuple(box) else ""
    raise DataError(
        f"{url}: block {index} ({_box_text(box)}{halo}): {count} bad value{'s' if count > 1 else ''} "
        f"({nan} NaN, {inf} Inf, {count - nan - inf} outside [0, 1]), the first at {where}; expected finite "
        "probabilities in [0, 1] (or uint8 round(255 p)): fix the input, then run again with --overwrite"
    )


def _read_input(url: str, item: tuple, index: int, box: Sequence[slice], read: Sequence[slice]) -> np.ndarray:
    """``url[item]`` of block ``index``, checked (:func:`check_block_values`).

    float16 (infer.py's HDF5 outputs) comes back as float32, the same values exactly: numpy reduces and
    compares float16 without SIMD (the value check alone took ~7 % of a run), and every block function
    casts to float32 or float64 anyway.
    """
    try:
        values = _open(url)[item]
        if values.dtype == np.float16:
            values = values.astype(np.float32)
    except (MeLeCoLeError, MemoryError):
        raise
    except Exception as error:  # stores raise many types for a damaged chunk or file
        raise DataError(
            f"{url}: cannot read block {index} ({_box_text(box)}): {_reason(error)}, expected a readable volume"
        ) from error
    check_block_values(values, url, index, box, read)
    return values


def _read_inputs(
    job: BlockwiseJob, index: int, read: Sequence[slice], channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Affinities (the first ``channels``) and foreground of block ``index`` over ``read``, checked."""
    box = job.plan.box(index)
    affinities = _read_input(job.affinities_url, (slice(channels),) + tuple(read), index, box, read)
    foreground = None
    if job.foreground_url:
        foreground = _read_input(job.foreground_url, tuple(read), index, box, read)
    return affinities, foreground


def _failing_chunk(array: Any, path: Path, box: Sequence[slice]) -> Path:
    """The first chunk of ``array`` under ``box`` that cannot be read (``path`` when each can)."""
    chunks = array.chunks
    grid = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, chunks)]
    for position in itertools.product(*grid):
        region = tuple(slice(p * c, min((p + 1) * c, n)) for p, c, n in zip(position, chunks, array.shape))
        try:
            array[region]
        except Exception:
            return path / array.metadata.encode_chunk_key(position)
    return path


def _read_work_array(path: Path, box: Sequence[slice]) -> np.ndarray:
    """A box of a work-folder zarr array; a chunk that cannot be decoded is named in a one-line DataError."""
    try:
        array = _open_array(path)
    except Exception as error:
        raise _damaged(path, error) from error
    try:
        return np.asarray(array[tuple(box)])
    except MemoryError:
        raise
    except Exception as error:
        raise _damaged(_failing_chunk(array, path, box), error) from error


def _write_work_array(path: Path, box: Sequence[slice], values: np.ndarray) -> None:
    """Writes a block into a work-folder zarr array (zarr writes each chunk to a temporary and renames it)."""
    try:
        _open_array(path)[tuple(box)] = values
    except OSError as error:
        raise _write_error(path, error, temporary=False) from error


def _load(path: Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)`` of a work file; a missing or undecodable file is a one-line DataError."""
    try:
        return load(path)
    except MemoryError:
        raise
    except Exception as error:
        raise _damaged(path, error) from error


def worker_memory_bytes(block_shape: Sequence[int], halo: Sequence[int], fragments: str) -> float:
    """Bytes a worker needs by the memory rule of thumb: voxels of a padded block (block + 2 x halo) x the
    fragment algorithm's ``bytes_per_padded_voxel``."""
    padded = np.prod([b + 2 * h for b, h in zip(block_shape, halo)], dtype=np.float64)
    return float(padded) * fragment_algorithm(fragments).bytes_per_padded_voxel


# -------------------------------------------------------------------------------------- tasks


def import_block_functions() -> None:
    """Imports this module's task functions and :data:`LAZY_IMPORTS` (a worker runs it when it starts)."""
    for name in LAZY_IMPORTS:
        importlib.import_module(name)


def fragments_task(job: BlockwiseJob, index: int) -> int:
    """Fragments of block ``index`` (read with the halo) -> fragments.zarr. Returns the block's voxels."""
    plan = job.plan
    outer, inner = plan.padded(index, job.options.halo)
    affinities, foreground = _read_inputs(job, index, outer, job.options.fragment_channels)
    fragments = fragments_of_block(affinities, foreground, inner, index, plan, job.options)
    _write_work_array(job.path / "fragments.zarr", plan.box(index), fragments)
    mark_done(job, "fragments", index)
    return int(fragments.size)


def graph_task(job: BlockwiseJob, index: int) -> int:
    """Edges of block ``index`` (fragments read with the offsets' reach) and fragment sizes -> graph/<i>.npz."""
    plan = job.plan
    outer, inner = plan.padded(index, job.options.reach)
    fragments = _read_work_array(job.path / "fragments.zarr", outer)
    affinities, _ = _read_inputs(job, index, plan.box(index))
    graph, ids, sizes = graph_of_block(fragments, affinities, inner, job.options)
    _save_atomically(
        job.path / "graph" / f"{index}.npz", lambda path: graph.save(path, ids=ids, sizes=sizes), binary_file=True
    )
    mark_done(job, "graph", index)
    return int(np.prod([s.stop - s.start for s in plan.box(index)]))


def agglomerate_task(job: BlockwiseJob, index: int = 0) -> dict[str, int]:
    """Reduces every block's edges (in block order), agglomerates, writes lookup.npz."""
    graphs, ids, sizes = [], [], []
    for block in range(job.plan.num_blocks):
        graph, block_ids, block_sizes = _load(job.path / "graph" / f"{block}.npz", _load_graph)
        graphs.append(graph)
        ids.append(block_ids)
        sizes.append(block_sizes)
    table, edges = agglomerate_blocks(graphs, ids, sizes, job.options)
    _save_atomically(job.path / "lookup.npz", table.save, binary_file=True)
    mark_done(job, "agglomerate", index)
    return {"fragments": len(table.fragments), "edges": edges, "segments": table.num_segments}


def _load_graph(path: Path) -> tuple[RegionGraph, np.ndarray, np.ndarray]:
    graph = RegionGraph.load(path)
    with np.load(path) as data:
        return graph, data["ids"], data["sizes"]


@functools.lru_cache(maxsize=2)
def _lookup(path: str, modified: float) -> LookupTable:
    return _load(Path(path), LookupTable.load)


def relabel_task(job: BlockwiseJob, index: int) -> int:
    """Segment ids of block ``index`` (background filled within the fill halo, by a watershed on the
    block's foreground with INFERENCE.FILL_MODE watershed) -> segmentation.zarr."""
    plan = job.plan
    fill = job.options.segmentation.fill_background
    outer, inner = plan.padded(index, job.options.fill_halo if fill else (0, 0, 0))
    lookup_path = job.path / "lookup.npz"
    try:
        modified = lookup_path.stat().st_mtime
    except OSError as error:
        raise _damaged(lookup_path, error) from error
    table = _lookup(str(lookup_path), modified)
    fragments = _read_work_array(job.path / "fragments.zarr", outer)
    heightmap = None
    if fill and job.foreground_url and job.options.segmentation.fill_mode == "watershed":
        foreground = _read_input(job.foreground_url, tuple(outer), index, plan.box(index), outer)
        heightmap = block_fill_heightmap(foreground, job.options)
    labels = relabel_block(fragments, table, inner, fill=fill, heightmap=heightmap)
    _write_work_array(job.output_path, plan.box(index), labels)
    mark_done(job, "relabel", index)
    return int(labels.size)
