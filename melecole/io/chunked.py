"""Chunk-by-chunk affinity prediction from a lazily read volume to a zarr / precomputed output.

The output is walked in blocks of ``chunk_shape``. Each block is read from the source with a
``halo`` of context on every side (clipped at the volume border), predicted with the
sliding-window predictor (:func:`melecole.inference.sliding_window.predict_volume`), cropped back
to the block and written. Memory is bounded by one padded block: the padded raw, the predictor's
(C + 1) float32 outputs for it, one batch of windows and the model, whatever the volume size.

Pairs (p, p + o) with p inside a block and p + o inside the volume are always valid because the
halo is at least the largest offset; pairs leaving the volume are invalid (0) as in
``predict_volume``. Window positions restart in every padded block, so values near block borders
differ slightly from one whole-volume prediction; a halo of half a window gives every voxel about
the context it has in a whole-volume run. A model that looks at single voxels (1x1x1 convolutions)
with constant blending gives exactly the whole-volume result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from melecole.errors import DataError
from melecole.io.volumes import LazyVolume, create_volume, iter_blocks, open_volume

__all__ = ["predict_affinities_chunked", "ChunkedPrediction", "Predictor"]

logger = logging.getLogger(__name__)

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


def _default_predictor() -> Predictor:
    from melecole.inference.sliding_window import predict_volume

    return predict_volume


def _to_model_input(raw: np.ndarray, value_range: Sequence[float] | None) -> np.ndarray:
    """uint8 stays (the predictor divides by 255), floats in [0, 1] stay; others need ``value_range``."""
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        scaled = (raw.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
        return np.clip(scaled, 0.0, 1.0, out=scaled)
    if raw.dtype == np.uint8 or np.issubdtype(raw.dtype, np.floating):
        return raw
    raise DataError(
        f"raw of dtype {raw.dtype}: pass value_range=(low, high) to map it to [0, 1] "
        "(chunked prediction cannot scan the whole volume for its range)"
    )


def _encode(affinities: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.rint(np.clip(affinities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return affinities.astype(dtype, copy=False)


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
    output_dtype: Literal["float32", "uint8"] = "float32",
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
        source: (Z, Y, X) raw: a URL for :func:`melecole.io.volumes.open_volume` or a LazyVolume.
        sink: affinity output URL (zarr or precomputed), written as an image with C channels
            (C, Z, Y, X); committed (renamed into place) only when every block is written.
        offsets: C affinity offsets (dz, dy, dx), passed on to the predictor.
        window: sliding-window size (wz, wy, wx), passed on to the predictor.
        chunk_shape: output block (z, y, x) predicted at once; bounds the memory.
        halo: context voxels read around each block (z, y, x); default ``max(window // 2, max |offset|)``.
            Must be >= the largest |offset| per axis.
        foreground_sink: optional (Z, Y, X) foreground probability output URL.
        output_dtype: float32, or uint8 (round(255 a)) for a 4x smaller output.
        storage_chunks: (z, y, x) storage chunk of the outputs; must divide ``chunk_shape`` (default:
            64 per axis where that divides it, else the block size).
        resolution: (z, y, x) nm; default the source's resolution, else (1, 1, 1).
        value_range: (low, high) mapped to [0, 1] for raw that is neither uint8 nor float.
        overwrite: replace existing outputs.
        progress: tqdm bar over blocks.
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
    offsets = [tuple(int(v) for v in offset) for offset in offsets]
    window = [int(w) for w in window]
    chunk_shape = [int(c) for c in chunk_shape]
    reach = [max(abs(offset[axis]) for offset in offsets) for axis in range(3)]
    halo = [max(w // 2, r) for w, r in zip(window, reach)] if halo is None else [int(h) for h in halo]
    if len(chunk_shape) != 3 or min(chunk_shape) < 1 or len(halo) != 3:
        raise ValueError(f"chunk_shape and halo need 3 values (z, y, x); got {chunk_shape}, {halo}")
    if any(h < r for h, r in zip(halo, reach)):
        raise ValueError(f"halo {halo} must be at least the largest |offset| per axis {reach}")
    if storage_chunks is None:
        storage_chunks = [64 if c % 64 == 0 else c for c in chunk_shape]
    storage_chunks = [int(c) for c in storage_chunks]
    if any(c % s for c, s in zip(chunk_shape, storage_chunks)):
        raise ValueError(f"storage_chunks {storage_chunks} must divide chunk_shape {chunk_shape}")
    if resolution is None:
        resolution = volume.resolution or (1.0, 1.0, 1.0)
    predictor = predictor or _default_predictor()
    dtype = np.dtype(output_dtype)
    shape = volume.shape
    affinity_writer = create_volume(
        sink,
        (len(offsets),) + shape,
        dtype,
        chunks=[len(offsets)] + storage_chunks,
        resolution=resolution,
        layer_type="image",
        overwrite=overwrite,
    )
    foreground_writer = None
    if foreground_sink is not None:
        foreground_writer = create_volume(
            foreground_sink,
            shape,
            dtype,
            chunks=storage_chunks,
            resolution=resolution,
            layer_type="image",
            overwrite=overwrite,
        )
    blocks = list(iter_blocks(shape, chunk_shape))
    try:
        for block in tqdm(blocks, desc="blocks", unit="block", disable=not progress):
            padded = tuple(
                slice(max(0, b.start - h), min(size, b.stop + h)) for b, h, size in zip(block, halo, shape)
            )
            raw = _to_model_input(volume.read(padded), value_range)
            affinities, foreground = predictor(
                model, raw, offsets=offsets, window=window, progress=False, **predict_kwargs
            )
            inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(block, padded))
            affinity_writer.write((slice(None),) + block, _encode(affinities[(slice(None),) + inner], dtype))
            if foreground_writer is not None:
                foreground_writer.write(block, _encode(foreground[inner], dtype))
            del raw, affinities, foreground
    except BaseException:
        affinity_writer.abort()
        if foreground_writer is not None:
            foreground_writer.abort()
        raise
    affinity_writer.commit()
    if foreground_writer is not None:
        foreground_writer.commit()
    seconds = time.perf_counter() - start_time
    logger.info(
        "predicted %d blocks of %s into %s in %.1f s", len(blocks), chunk_shape, affinity_writer.url, seconds
    )
    return ChunkedPrediction(
        affinities_url=affinity_writer.url,
        foreground_url=foreground_writer.url if foreground_writer is not None else None,
        shape=affinity_writer.shape,
        chunks=len(blocks),
        seconds=seconds,
    )
