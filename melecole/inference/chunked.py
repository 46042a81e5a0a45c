"""Chunk-by-chunk affinity prediction from a lazily read volume to a zarr / precomputed output.

The output is walked in blocks of ``chunk_shape``. Each block is read from the source with a
``halo`` of context on every side (clipped at the volume border), predicted with the
sliding-window predictor (:func:`melecole.inference.sliding_window.predict_volume`), cropped back
to the block and written. Memory is bounded by one padded block: the padded raw, the predictor's
(C + 1) float32 outputs for it, one batch of windows and the model, whatever the volume size.

Pairs (p, p + o) with p inside a block and p + o inside the volume are always valid because the
halo is at least the largest offset; pairs leaving the volume are invalid (0) as in
``predict_volume``. The default halo (:func:`exact_halo`) makes the result equal to one
whole-volume prediction; a smaller halo is faster and differs slightly near block borders.

``infer.py --affinities-only`` is :func:`predict_affinities_to_store` (checkpoint + options).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from melecole.errors import ConfigError, DataError
from melecole.inference.options import PredictOptions, default_stride
from melecole.inference.planner import NOMINAL_BLOCK
from melecole.inference.sliding_window import predict_volume
from melecole.io import (
    LazyVolume,
    VolumeWriter,
    check_finite,
    create_volume,
    iter_blocks,
    model_input,
    open_volume,
    output_error,
)
from melecole.io.codec import encode_probabilities
from melecole.utils.offsets import offset_reach
from melecole.utils.progress import progress_bar

__all__ = [
    "DEFAULT_CHUNK",
    "read_padded_block",
    "storage_chunks_for",
    "store_geometry",
    "open_block_input",
    "ChunkedPrediction",
    "Predictor",
    "exact_halo",
    "predict_affinities_chunked",
    "predict_affinities_to_store",
]

logger = logging.getLogger(__name__)

# Output block (z, y, x) of --affinities-only before rounding up to a multiple of the stride; the
# block plan of INFERENCE.WINDOW_SIZE auto is made for this block (planner.plan_block_windows).
DEFAULT_CHUNK = NOMINAL_BLOCK
OutputDtype = Literal["float32", "uint8"]

# predictor(model, raw (Z, Y, X) uint8 or float in [0, 1], **kwargs)
#   -> (affinities (C, Z, Y, X), foreground (Z, Y, X)), like predict_volume
Predictor = Callable[..., "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class ChunkedPrediction:
    """What :func:`predict_affinities_chunked` wrote.

    Attributes:
        affinities_url: the affinity output (C, Z, Y, X).
        foreground_url: the foreground output (Z, Y, X), or None.
        shape: (C, Z, Y, X) of the affinities.
        chunks: number of output blocks predicted.
        seconds: wall time.
    """

    affinities_url: str
    foreground_url: str | None
    shape: tuple[int, ...]
    chunks: int
    seconds: float


def exact_halo(window: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Halo (z, y, x) that makes chunked prediction equal to one whole-volume ``predict_volume``.

    With blocks and halo both multiples of the stride, every padded block starts on the
    whole-volume window grid; a halo of at least one window means that every window covering a
    block voxel is a whole-volume window, with the same crop, and no window aligned to a padded
    block's end reaches the block (at the volume border the padded block ends where the volume
    does). So: the window rounded up to a multiple of the stride.
    """
    return [math.ceil(w / s) * s for w, s in zip(window, stride)]


def storage_chunks_for(chunk_shape: Sequence[int]) -> list[int]:
    """Per axis the largest divisor of the block that is <= 64 (the block itself if that is < 16)."""
    storage = []
    for size in chunk_shape:
        divisor = max(d for d in range(1, min(64, size) + 1) if size % d == 0)
        storage.append(divisor if divisor >= min(16, size) else size)
    return storage


@dataclass(frozen=True)
class _ChunkPlan:
    """Checked geometry of a chunked prediction."""

    offsets: list[tuple[int, ...]]
    chunk_shape: list[int]
    halo: list[int]
    storage_chunks: list[int]


def _plan(
    offsets: Sequence[Sequence[int]],
    window: Sequence[int],
    predict_kwargs: dict[str, Any],
    chunk_shape: Sequence[int],
    halo: Sequence[int] | None,
    storage_chunks: Sequence[int] | None,
) -> _ChunkPlan:
    """Checks block, halo and storage chunks; the default halo is :func:`exact_halo`."""
    offsets = [tuple(int(v) for v in offset) for offset in offsets]
    chunk_shape = [int(c) for c in chunk_shape]
    reach = offset_reach(offsets)
    if halo is None:
        stride = predict_kwargs.get("stride") or default_stride(
            window, predict_kwargs.get("margin", (0, 0, 0)), offsets
        )
        halo = exact_halo(window, stride)
    halo = [int(h) for h in halo]
    if len(chunk_shape) != 3 or min(chunk_shape) < 1 or len(halo) != 3:
        raise ValueError(f"chunk_shape and halo need 3 values (z, y, x); got {chunk_shape}, {halo}")
    if any(h < r for h, r in zip(halo, reach)):
        raise ValueError(f"halo {halo} must be at least the largest |offset| per axis {list(reach)}")
    if storage_chunks is None:
        storage_chunks = [64 if c % 64 == 0 else c for c in chunk_shape]
    storage_chunks = [int(c) for c in storage_chunks]
    if any(c % s for c, s in zip(chunk_shape, storage_chunks)):
        raise ValueError(f"storage_chunks {storage_chunks} must divide chunk_shape {chunk_shape}")
    return _ChunkPlan(offsets, chunk_shape, halo, storage_chunks)


def _open_writers(
    volume: LazyVolume,
    sinks: tuple[str | os.PathLike, str | os.PathLike | None],
    plan: _ChunkPlan,
    dtype: np.dtype,
    resolution: Sequence[float],
    overwrite: bool,
) -> list[VolumeWriter | None]:
    """[affinity writer (C, Z, Y, X), foreground writer (Z, Y, X) or None]."""
    affinity_sink, foreground_sink = sinks
    options = dict(resolution=resolution, layer_type="image", overwrite=overwrite)
    channels = len(plan.offsets)
    writers: list[VolumeWriter | None] = [
        create_volume(
            affinity_sink, (channels,) + volume.shape, dtype, chunks=[channels] + plan.storage_chunks, **options
        )
    ]
    writers.append(
        None
        if foreground_sink is None
        else create_volume(foreground_sink, volume.shape, dtype, chunks=plan.storage_chunks, **options)
    )
    return writers


def read_padded_block(
    volume: LazyVolume, block: tuple[slice, ...], halo: Sequence[int], value_range: Sequence[float] | None
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Model input of ``block`` plus ``halo`` (clipped at the volume border), and where the block
    lies inside it; a block with NaN / Inf is a DataError naming the volume and the block."""
    padded = tuple(slice(max(0, b.start - h), min(size, b.stop + h)) for b, h, size in zip(block, halo, volume.shape))
    inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(block, padded))
    raw = volume.read(padded)
    check_finite(raw, f"input '{volume.url}' block {[(p.start, p.stop) for p in padded]} (z, y, x)")
    return model_input(raw, value_range), inner


def predict_affinities_chunked(
    model: torch.nn.Module,
    source: str | os.PathLike | LazyVolume,
    sink: str | os.PathLike,
    *,
    offsets: Sequence[Sequence[int]],
    window: Sequence[int],
    chunk_shape: Sequence[int] = (32, 256, 256),
    halo: Sequence[int] | None = None,
    foreground_sink: str | os.PathLike | None = None,
    output_dtype: OutputDtype = "float32",
    storage_chunks: Sequence[int] | None = None,
    resolution: Sequence[float] | None = None,
    value_range: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    predictor: Predictor | None = None,
    **predict_kwargs: Any,
) -> ChunkedPrediction:
    """Predicts affinities block by block from ``source`` to ``sink``.

    Args:
        model: as for ``predict_volume``: forward(x (B, 1, z, y, x)) -> dict(embedding, foreground),
            already on ``predict_kwargs["device"]``.
        source: (Z, Y, X) raw: a URL for :func:`melecole.io.open_volume` or a LazyVolume.
        sink: affinity output URL (zarr or precomputed), written as an image with C channels
            (C, Z, Y, X); committed (renamed into place) only when every block is written.
        offsets: C affinity offsets (dz, dy, dx), passed on to the predictor.
        window: sliding-window size (wz, wy, wx), passed on to the predictor.
        chunk_shape: output block (z, y, x) predicted at once; bounds the memory.
        halo: context voxels read around each block (z, y, x); default :func:`exact_halo` (the
            whole-volume result). Must be >= the largest |offset| per axis.
        foreground_sink: optional (Z, Y, X) foreground probability output URL.
        output_dtype: float32, or uint8 (round(255 a)) for a 4x smaller output.
        storage_chunks: (z, y, x) storage chunk of the outputs; must divide ``chunk_shape`` (default:
            64 per axis where that divides it, else the block size).
        resolution: (z, y, x) nm; default the source's resolution, else (1, 1, 1).
        value_range: (low, high) mapped to [0, 1] for raw that is neither uint8 nor float.
        overwrite: replace existing outputs.
        progress: progress over blocks.
        predictor: replaces ``predict_volume`` (same call signature), e.g. for tests.
        **predict_kwargs: the predictor's other options: delta_d, norm, stride, margin, blending,
            batch_size, device, amp.

    Returns:
        A :class:`ChunkedPrediction` summary.
    """
    start_time = time.perf_counter()
    volume = source if isinstance(source, LazyVolume) else open_volume(source)
    if volume.ndim != 3:
        raise DataError(f"source '{volume.url}' must be (Z, Y, X) raw, got shape {volume.shape}")
    plan = _plan(offsets, window, predict_kwargs, chunk_shape, halo, storage_chunks)
    predictor = predictor or predict_volume
    dtype = np.dtype(output_dtype)
    sinks = (sink, foreground_sink)
    writers = _open_writers(volume, sinks, plan, dtype, resolution or volume.resolution or (1.0, 1.0, 1.0), overwrite)
    blocks = list(iter_blocks(volume.shape, plan.chunk_shape))
    try:
        for block in progress_bar(blocks, desc="blocks", unit="block", enabled=progress):
            raw, inner = read_padded_block(volume, block, plan.halo, value_range)
            outputs = predictor(model, raw, offsets=plan.offsets, window=window, progress=False, **predict_kwargs)
            for writer, output, box in zip(writers, outputs, ((slice(None),) + block, block)):
                if writer is not None:
                    writer.write(box, encode_probabilities(output[(Ellipsis,) + inner], dtype))
            del raw, outputs
    except BaseException as error:
        for writer in filter(None, writers):
            writer.abort()
        if isinstance(error, OSError):  # full disk, quota: one line, the temporary folders are gone
            raise output_error(sink, error) from None
        raise
    for writer in filter(None, writers):
        writer.commit()
    seconds = time.perf_counter() - start_time
    affinity_writer, foreground_writer = writers
    logger.info("predicted %d blocks of %s into %s in %.1f s", len(blocks), plan.chunk_shape, sink, seconds)
    foreground_url = foreground_writer.url if foreground_writer is not None else None
    return ChunkedPrediction(affinity_writer.url, foreground_url, affinity_writer.shape, len(blocks), seconds)


def store_geometry(
    options: PredictOptions, chunk_shape: Sequence[int] | None, halo: Sequence[int] | None
) -> tuple[list[int], list[int]]:
    """(block rounded up to a multiple of the stride, halo (default :func:`exact_halo`)), checked."""
    halo = exact_halo(options.window, options.stride) if halo is None else [int(h) for h in halo]
    chunk = [math.ceil(int(c) / s) * s for c, s in zip(chunk_shape or DEFAULT_CHUNK, options.stride)]
    if len(halo) != 3 or any(h < r for h, r in zip(halo, options.reach)):
        raise ConfigError(f"--halo {halo} must be 3 values, each at least the largest |offset| {list(options.reach)}")
    if len(chunk) != 3 or min(chunk) < 1:
        raise ConfigError(f"--chunk {list(chunk_shape or [])} must be 3 positive values (z, y, x)")
    return chunk, halo


def open_block_input(input_url: str, raw_key: str | None, flag: str) -> LazyVolume:
    """The raw of a block-by-block prediction (``flag``: the infer.py option, for the error): uint8 or
    float in [0, 1], since blocks are normalised without the whole volume's range."""
    from melecole.inference.inputs import resolve_input

    volume = resolve_input(input_url, raw_key).open()
    if volume.dtype != np.uint8 and not np.issubdtype(volume.dtype, np.floating):
        raise DataError(
            f"input '{volume.url}' has dtype {volume.dtype}; {flag} reads block by block and needs "
            f"uint8 or float raw in [0, 1] (convert it, or run infer.py without {flag})"
        )
    return volume


def predict_affinities_to_store(
    options: PredictOptions,
    checkpoint_path: str | os.PathLike,
    input_url: str | None,
    affinities_url: str | None,
    *,
    cfg: Any,
    membranes_url: str | None = None,
    raw_key: str | None = None,
    chunk_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    output_dtype: OutputDtype = "float32",
    resolution: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ChunkedPrediction:
    """``infer.py --affinities-only``: chunk-by-chunk affinities from any input to zarr / precomputed.

    No mutex watershed and no HDF5 results; memory is bounded by one block plus its halo. The
    outputs cover the whole raw (no DATASET.PADDING crop).

    Args:
        options: prediction options (:func:`melecole.inference.options.build_predict_options`).
        checkpoint_path: checkpoint file or run folder.
        input_url: (Z, Y, X) raw, uint8 or float in [0, 1]: HDF5, zarr or precomputed URL.
        affinities_url: zarr / precomputed output, (C, Z, Y, X) image.
        cfg: the merged config, only to check it against the checkpoint's model shape.
        membranes_url: optional (Z, Y, X) foreground probability output.
        raw_key: raw dataset / array when the input URL names none.
        chunk_shape: output block (z, y, x), rounded up to a multiple of the stride (default (32, 256, 256)).
        halo: context per side (z, y, x); default :func:`exact_halo`.
        output_dtype: float32, or uint8 round(255 a).
        resolution: (z, y, x) nm; default the input's, else (1, 1, 1).
        overwrite: replace existing outputs (else a DataError before any compute).
        progress: progress over blocks.

    Raises:
        ConfigError: missing input / output, bad URL, halo or chunk.
        DataError: missing input, existing output, raw neither uint8 nor float.
        CheckpointError: as for :func:`melecole.inference.pipeline.run_inference`.
    """
    from melecole.engine.checkpoint import build_model_from_checkpoint
    from melecole.inference.stores import check_store_url

    if not input_url or not affinities_url:
        raise ConfigError("--affinities-only needs --input URL and --output-affinities URL")
    check_store_url(affinities_url, "--output-affinities", overwrite=overwrite)
    if membranes_url:
        check_store_url(membranes_url, "--output-membranes", overwrite=overwrite)
    chunk, halo = store_geometry(options, chunk_shape, halo)
    volume = open_block_input(input_url, raw_key, "--affinities-only")
    options.configure_threads()
    model, _, checkpoint = build_model_from_checkpoint(checkpoint_path, cfg, device=options.torch_device)
    logger.info(
        "checkpoint %s on %s: %s %s -> %s in blocks %s, halo %s",
        checkpoint["path"], options.device, volume.url, volume.shape, affinities_url, chunk, halo,
    )
    outputs = dict(foreground_sink=membranes_url or None, output_dtype=output_dtype, resolution=resolution)
    return predict_affinities_chunked(
        model,
        volume,
        affinities_url,
        chunk_shape=chunk,
        halo=halo,
        storage_chunks=storage_chunks_for(chunk),
        overwrite=overwrite,
        progress=progress,
        **outputs,
        **options.predict_kwargs(),
    )
