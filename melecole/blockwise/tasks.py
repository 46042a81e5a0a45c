"""Block tasks on files: read inputs, call the numpy block functions, write outputs, mark done.

Nothing here knows dask: each task is a plain function ``task(job, block_index)`` that any engine
can call in any process, in any order, any number of times (a rerun rewrites the same result).
A block counts as done only when its marker exists, and the marker is written (atomically) after
the block's outputs were completely written.

Work folder (beside the output, removed after the output is committed)::

    manifest.json       inputs, shape and options (a resumed run must match them)
    fragments.zarr      uint64 global fragment ids, chunks = BLOCKWISE.OUTPUT_CHUNKS
    graph/<i>.npz       block i's edges (RegionGraph) and fragment sizes
    lookup.npz          fragment -> segment table (LookupTable)
    segmentation.zarr   the output, chunks = BLOCKWISE.OUTPUT_CHUNKS; renamed into place at the end
    done/<pass>/<i>     markers: fragments, graph, agglomerate (i = 0), relabel
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from melecole.blockwise.plan import BlockPlan, BlockwiseOptions
from melecole.blockwise.relabel import relabel_block
from melecole.blockwise.segment import fragments_of_block, graph_of_block
from melecole.inference.agglomeration import LookupTable, agglomerate
from melecole.inference.region_graph import RegionGraph, reduce_graphs
from melecole.io.volumes import LazyVolume, open_volume

__all__ = [
    "BlockwiseJob",
    "prepare_workdir",
    "is_done",
    "mark_done",
    "atomic_write_bytes",
    "read_manifest",
    "ensure_work_array",
    "json_safe",
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
LAZY_IMPORTS = ("zarr", "h5py", "bioimage_cpp.segmentation", "bioimage_cpp.graph.mutex_watershed")


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _marker(job: BlockwiseJob, name: str, index: int) -> Path:
    return job.path / "done" / name / str(index)


def is_done(job: BlockwiseJob, name: str, index: int) -> bool:
    """True when block ``index`` of pass ``name`` finished writing its outputs."""
    return _marker(job, name, index).is_file()


def mark_done(job: BlockwiseJob, name: str, index: int) -> None:
    atomic_write_bytes(_marker(job, name, index), b"done\n")


def prepare_workdir(job: BlockwiseJob) -> None:
    """Creates the work folder, its stores and the manifest (existing ones are kept, for resume)."""
    for name in BLOCK_PASSES + ("agglomerate",):
        (job.path / "done" / name).mkdir(parents=True, exist_ok=True)
    (job.path / "graph").mkdir(exist_ok=True)
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
    exists already (a resumed run) is kept."""
    import zarr

    if (Path(path) / ".zarray").is_file():
        return
    array = zarr.create_array(
        store=str(path), shape=tuple(shape), chunks=list(chunks), dtype=dtype, zarr_format=2, fill_value=0
    )
    array.attrs.update({"resolution": list(resolution), "axes": ["z", "y", "x"], "units": "nm", **attrs})


def json_safe(value: Any) -> Any:
    """Tuples -> lists, recursively (a manifest read back from json compares equal)."""
    return json.loads(json.dumps(value))


def read_manifest(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a work folder, or None when there is none."""
    path = Path(workdir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


@functools.lru_cache(maxsize=8)
def _open(url: str) -> LazyVolume:
    return open_volume(url)


def _open_array(path: Path) -> Any:
    import zarr

    return zarr.open_array(str(path), mode="r+")


def _read_inputs(
    job: BlockwiseJob, outer: Sequence[slice], channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    affinities = _open(job.affinities_url)[(slice(channels),) + tuple(outer)]
    foreground = _open(job.foreground_url)[tuple(outer)] if job.foreground_url else None
    return affinities, foreground


# -------------------------------------------------------------------------------------- tasks


def import_block_functions() -> None:
    """Imports this module's task functions and :data:`LAZY_IMPORTS` (a worker runs it when it starts)."""
    for name in LAZY_IMPORTS:
        importlib.import_module(name)


def fragments_task(job: BlockwiseJob, index: int) -> int:
    """Fragments of block ``index`` (read with the halo) -> fragments.zarr. Returns the block's voxels."""
    plan = job.plan
    outer, inner = plan.padded(index, job.options.halo)
    affinities, foreground = _read_inputs(job, outer, job.options.fragment_channels)
    fragments = fragments_of_block(affinities, foreground, inner, index, plan, job.options)
    _open_array(job.path / "fragments.zarr")[plan.box(index)] = fragments
    mark_done(job, "fragments", index)
    return int(fragments.size)


def graph_task(job: BlockwiseJob, index: int) -> int:
    """Edges of block ``index`` (fragments read with the offsets' reach) and fragment sizes -> graph/<i>.npz."""
    plan = job.plan
    outer, inner = plan.padded(index, job.options.reach)
    fragments = np.asarray(_open_array(job.path / "fragments.zarr")[outer])
    affinities, _ = _read_inputs(job, plan.box(index))
    graph, ids, sizes = graph_of_block(fragments, affinities, inner, job.options)
    path = job.path / "graph" / f"{index}.npz"
    temporary = path.parent / f".{index}.tmp-{uuid.uuid4().hex[:8]}.npz"
    graph.save(temporary, ids=ids, sizes=sizes)
    os.replace(temporary, path)
    mark_done(job, "graph", index)
    return int(np.prod([s.stop - s.start for s in plan.box(index)]))


def agglomerate_task(job: BlockwiseJob, index: int = 0) -> dict[str, int]:
    """Reduces every block's edges (in block order), agglomerates, writes lookup.npz."""
    graphs, ids, sizes = [], [], []
    for block in range(job.plan.num_blocks):
        path = job.path / "graph" / f"{block}.npz"
        graphs.append(RegionGraph.load(path))
        with np.load(path) as data:
            ids.append(data["ids"])
            sizes.append(data["sizes"])
    graph = reduce_graphs(graphs)
    del graphs
    options = job.options
    table = agglomerate(
        graph,
        np.concatenate(ids),
        np.concatenate(sizes),
        mode=options.agglomeration,
        threshold=options.threshold,
        min_size=options.min_segment_size,
    )
    temporary = job.path / f".lookup.tmp-{uuid.uuid4().hex[:8]}.npz"
    table.save(temporary)
    os.replace(temporary, job.path / "lookup.npz")
    mark_done(job, "agglomerate", index)
    return {"fragments": len(table.fragments), "edges": len(graph), "segments": table.num_segments}


@functools.lru_cache(maxsize=2)
def _lookup(path: str, modified: float) -> LookupTable:
    return LookupTable.load(path)


def relabel_task(job: BlockwiseJob, index: int) -> int:
    """Segment ids of block ``index`` (background filled within the fill halo) -> segmentation.zarr."""
    plan = job.plan
    fill = job.options.fill_background
    outer, inner = plan.padded(index, job.options.fill_halo if fill else (0, 0, 0))
    lookup_path = job.path / "lookup.npz"
    table = _lookup(str(lookup_path), lookup_path.stat().st_mtime)
    fragments = np.asarray(_open_array(job.path / "fragments.zarr")[outer])
    labels = relabel_block(fragments, table, inner, fill=fill)
    _open_array(job.output_path)[plan.box(index)] = labels
    mark_done(job, "relabel", index)
    return int(labels.size)
