"""Affinity prediction as a pass of block tasks, so ``infer.py --blockwise`` is one dask run.

Each task predicts one block of the volume with the exact halo (:func:`melecole.inference.chunked.
exact_halo`: the values equal one whole-volume prediction, as ``infer.py --affinities-only``) and
writes it into two uint8 zarr arrays of the prediction folder. Blocks are whole numbers of the
storage chunks, so no two tasks write one chunk; a block's marker is written after its data. Each
worker process builds the model once and keeps it for its next blocks.

Prediction folder (a hidden sibling of the output, removed once the segmentation is committed)::

    manifest.json      checkpoint, input, geometry and prediction options (a resume must match them)
    affinities.zarr    uint8 round(255 a), (C, Z, Y, X)
    foreground.zarr    uint8 round(255 p), (Z, Y, X)
    done/predict/<i>   markers
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from melecole.blockwise.plan import BlockPlan
from melecole.blockwise.tasks import atomic_write_bytes, ensure_work_array, json_safe, mark_done, read_manifest
from melecole.errors import DataError
from melecole.io.volumes import LazyVolume, open_volume

__all__ = [
    "PredictionJob",
    "plan_prediction",
    "prepare_prediction",
    "predict_task",
    "default_threads",
    "worker_threads",
    "PREDICT_PASS",
]

PREDICT_PASS = "predict"
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class PredictionJob:
    """Chunked prediction of one input with one checkpoint (picklable; sent to every worker).

    Attributes:
        checkpoint: checkpoint file (already checked against the config by the driver).
        input_url: (Z, Y, X) raw, uint8 or float in [0, 1].
        workdir: the prediction folder.
        shape: (Z, Y, X) of the raw.
        block_shape: predicted at once, a multiple of the window stride (bounds a worker's memory).
        halo: context read around a block.
        options: :class:`melecole.inference.options.PredictOptions`.
        threads: torch CPU threads per worker process (0 = leave torch's default).
        resolution: (z, y, x) nm written into the outputs' attributes.
    """

    checkpoint: str
    input_url: str
    workdir: str
    shape: Triple
    block_shape: Triple
    halo: Triple
    options: Any
    threads: int = 0
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def plan(self) -> BlockPlan:
        return BlockPlan(self.shape, self.block_shape)

    @property
    def path(self) -> Path:
        return Path(self.workdir)

    @property
    def affinities_url(self) -> str:
        return str(self.path / "affinities.zarr")

    @property
    def foreground_url(self) -> str:
        return str(self.path / "foreground.zarr")

    def manifest(self) -> dict[str, Any]:
        stat = Path(self.checkpoint).stat()
        return {
            "checkpoint": {"path": self.checkpoint, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "input": self.input_url,
            "shape": list(self.shape),
            "block": list(self.block_shape),
            "halo": list(self.halo),
            "prediction": self.options.fingerprint(),
        }


def plan_prediction(
    cfg: Any, checkpoint: str, input_url: str, raw_key: str | None, workdir: Path, threads: int,
    chunk: Any = None, halo: Any = None,
) -> PredictionJob:
    """Checks checkpoint, config and input (one-line errors, before any cluster work) -> the job.

    ``chunk`` / ``halo``: as ``infer.py --chunk / --halo`` (defaults: (32, 256, 256) rounded up to the
    stride, and the exact halo)."""
    from melecole.engine.checkpoint import check_model_compatible, load_checkpoint
    from melecole.inference.chunked import open_block_input, store_geometry
    from melecole.inference.options import build_predict_options

    options = build_predict_options(cfg)
    block, halo = store_geometry(options, chunk, halo)
    volume = open_block_input(input_url, raw_key, "--blockwise")
    if volume.ndim != 3:
        raise DataError(f"input '{volume.url}': shape {list(volume.shape)}, expected (Z, Y, X) raw")
    loaded = load_checkpoint(checkpoint)
    check_model_compatible(loaded, cfg)
    if options.num_threads:
        threads = options.num_threads
    return PredictionJob(
        str(loaded["path"]), str(volume.url), str(workdir), tuple(volume.shape), tuple(block), tuple(halo),
        options, int(threads), tuple(volume.resolution or (1.0, 1.0, 1.0)),
    )


def prepare_prediction(job: PredictionJob, resume: bool, overwrite: bool = False, what: str = "--output") -> int:
    """Creates (or, with ``resume`` and the same manifest, keeps) the prediction folder.

    Returns the number of blocks already predicted. With ``overwrite`` an old folder's work files are
    removed; a folder that holds anything else is never touched.

    Raises:
        DataError: an interrupted prediction without ``resume`` / ``overwrite``, or ``resume`` finds a
            folder made with another checkpoint, input or options.
    """
    from melecole.blockwise.output import clear_work_folder
    from melecole.inference.chunked import storage_chunks_for

    manifest = read_manifest(job.path)
    expected = json_safe(job.manifest())
    if manifest is not None and not resume and not overwrite:
        raise DataError(
            f"{job.path}: an interrupted prediction of this output, expected --resume to finish it or --overwrite"
        )
    if manifest is not None and resume and manifest != expected:
        raise DataError(
            f"{job.path}: the interrupted prediction used another checkpoint, input or options, expected the "
            "same command (or --overwrite to start again)"
        )
    fresh = manifest is None or not resume
    if fresh:
        clear_work_folder(job.path, what)
    (job.path / "done" / PREDICT_PASS).mkdir(parents=True, exist_ok=True)
    storage = storage_chunks_for(job.block_shape)
    channels = len(job.options.offsets)
    ensure_work_array(job.affinities_url, (channels, *job.shape), [channels, *storage], np.uint8, job.resolution)
    ensure_work_array(job.foreground_url, job.shape, storage, np.uint8, job.resolution)
    if fresh:
        atomic_write_bytes(job.path / "manifest.json", json.dumps(expected, indent=1).encode())
    done = job.path / "done" / PREDICT_PASS
    return sum(1 for _ in done.iterdir())


@functools.lru_cache(maxsize=2)
def _open(url: str) -> LazyVolume:
    return open_volume(url)


@functools.lru_cache(maxsize=1)
def _model(checkpoint: str, device: str) -> Any:
    """The checkpoint's model in eval mode, built once per worker process."""
    from melecole.engine.checkpoint import build_model_from_checkpoint

    model, _, _ = build_model_from_checkpoint(checkpoint, None, device=device)
    return model


def worker_threads(threads: int) -> int:
    """Sets this process's torch CPU threads to ``threads`` (0: leaves them) -> torch's thread count now.

    Called by every prediction task, before its model is built or run: a worker of the LocalCluster
    starts with ``OMP_NUM_THREADS=1`` (:func:`melecole.blockwise.runner.worker_environment`, for the
    single-threaded segmentation tasks), so without it the model would run on one thread; the
    onnxruntime / openvino backends take torch's count too.
    """
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def predict_task(job: PredictionJob, index: int) -> int:
    """Affinities and foreground of block ``index`` -> the prediction folder. Returns the block's voxels."""
    from melecole.inference.chunked import read_padded_block
    from melecole.inference.sliding_window import predict_volume
    from melecole.io import open_work_array
    from melecole.io.codec import encode_probabilities

    box = job.plan.box(index)
    raw, inner = read_padded_block(_open(job.input_url), box, job.halo, None)
    worker_threads(job.threads)
    model = _model(job.checkpoint, job.options.device)
    affinities, foreground = predict_volume(model, raw, progress=False, **job.options.predict_kwargs())
    outputs = ((job.affinities_url, affinities, (slice(None),) + box), (job.foreground_url, foreground, box))
    for path, values, target in outputs:
        open_work_array(path)[target] = encode_probabilities(values[(Ellipsis,) + inner], np.uint8)
    mark_done(job, PREDICT_PASS, index)
    return int(np.prod([s.stop - s.start for s in box]))


def default_threads(workers: int) -> int:
    """Torch threads per LocalCluster worker: the cores this process may use, shared out (at least 1)."""
    from melecole.utils.device import usable_cpu_count

    return max(1, usable_cpu_count() // max(1, workers))
