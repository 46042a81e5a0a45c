"""Inference inputs and outputs beyond HDF5 files: zarr and Neuroglancer precomputed (CloudVolume).

Inputs (``infer.py --input URL``, :func:`resolve_input`): a plain HDF5 file (read whole, labels and
DATASET.PADDING as before), ``file.hdf:key`` (the same, raw dataset ``key``), a zarr array
(``x.zarr``, ``x.zarr:key``, ``zarr://folder``) or a precomputed layer (``precomputed://file:///abs``,
``gs://...``, ...). Zarr and precomputed raw is read block by block into memory (the mutex watershed
needs the whole volume); it has no labels.

Outputs:

- :func:`export_results`: after a normal run, the segmentation(s) and affinities as layers
  ``<URL>/segmentation`` (compressed_segmentation for precomputed) and ``<URL>/affinities``
  (C-channel image), streamed block by block from the HDF5 results.
- :func:`predict_affinities_to_store`: ``infer.py --affinities-only``: affinities (and foreground)
  predicted chunk by chunk from any input URL to a zarr / precomputed output, memory bounded by one
  block plus its halo. The default halo makes the result equal to one whole-volume prediction.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from yacs.config import CfgNode as CN

from melecole.errors import ConfigError, DataError
from melecole.inference.sliding_window import inference_device, predict_options
from melecole.io import ChunkedPrediction, LazyVolume, create_volume, iter_blocks, open_volume, parse_volume_url

if TYPE_CHECKING:
    from melecole.data.volume import Volume
    from melecole.inference.pipeline import VolumeResult

__all__ = [
    "DEFAULT_CHUNK",
    "InputSource",
    "check_store_url",
    "exact_halo",
    "export_results",
    "join_store_url",
    "predict_affinities_to_store",
    "read_input",
    "resolve_input",
]

logger = logging.getLogger(__name__)

# Output block (z, y, x) of --affinities-only before rounding up to a multiple of the stride.
DEFAULT_CHUNK = (32, 256, 256)
OutputDtype = Literal["float32", "uint8"]


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class InputSource:
    """One inference input.

    Attributes:
        url: as given on the command line.
        prefix: output file prefix (HDF5: the file stem; zarr: root stem [+ _key]; precomputed: the
            layer's last path part), made of letters, digits, '.', '_' and '-'.
        hdf5_path: the HDF5 file for HDF5 inputs (read whole with labels), else None.
        raw_key: HDF5 dataset / zarr array holding the raw; None = the store's only array.
    """

    url: str
    prefix: str
    hdf5_path: Path | None
    raw_key: str | None

    def open(self) -> LazyVolume:
        """The raw as a lazy volume (nothing is read)."""
        if self.hdf5_path is not None:
            return open_volume(f"{self.hdf5_path}:{self.raw_key}")
        return open_volume(self.url, default_key=self.raw_key)


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"


def resolve_input(url: str | os.PathLike, raw_key: str | None) -> InputSource:
    """Checks an input URL and names its outputs; nothing is read but the store's metadata.

    Args:
        url: an existing file (HDF5, any suffix), ``file.hdf:key``, zarr or precomputed URL
            (:func:`melecole.io.parse_volume_url`).
        raw_key: raw dataset / zarr array when the URL names none (e.g. DATASET.RAW_KEY); a key in
            the URL wins. For zarr it is used only if the group holds it; a group with one array
            opens that one.

    Raises:
        DataError: missing input, unknown format, or no unambiguous raw array.
    """
    text = os.fspath(url)
    if Path(text).is_file():  # plain HDF5 file, whatever its suffix (as before)
        return InputSource(text, Path(text).stem, Path(text), raw_key)
    try:
        parsed = parse_volume_url(text)
    except DataError:
        if not Path(text).exists():
            raise DataError(f"input '{text}' does not exist") from None
        raise
    if parsed.format == "hdf5":
        path = Path(parsed.path)
        if not path.is_file():
            raise DataError(f"input file '{path}' does not exist")
        return InputSource(text, path.stem, path, parsed.key or raw_key)
    if parsed.format == "zarr":
        prefix = Path(parsed.path).name.removesuffix(".zarr") + (f"_{parsed.key}" if parsed.key else "")
    else:
        prefix = parsed.path.rstrip("/").rsplit("/", 1)[-1]
    source = InputSource(text, _sanitise(prefix), None, raw_key)
    volume = source.open()  # missing store / ambiguous array: one-line DataError now, before the model
    if volume.ndim != 3:
        raise DataError(f"input '{volume.url}' must be (Z, Y, X) raw, got shape {volume.shape}")
    return source


def read_input(source: InputSource, cfg: CN) -> tuple[Volume, dict[str, Any], tuple[float, ...] | None]:
    """Reads an input into memory.

    HDF5 inputs go through :func:`melecole.data.volume.read_volume` (labels when the file has
    DATASET.LABEL_KEY, DATASET.PADDING); zarr / precomputed raw is read block by block (z-slabs of
    the storage chunk height), without labels.

    Returns:
        volume: the :class:`~melecole.data.volume.Volume`.
        identity: what the cached predictions depend on about the input (JSON-able): file size and
            mtime for HDF5, the raw's SHA-256 for zarr / precomputed (folders have no reliable mtime).
        resolution: (z, y, x) nm stored with the raw, or None.
    """
    import h5py

    from melecole.data.volume import Volume, _value_range, read_volume

    if source.hdf5_path is not None:
        path, label_key = source.hdf5_path, cfg.DATASET.LABEL_KEY
        try:
            with h5py.File(path, "r") as handle:
                has_labels = label_key in handle
        except OSError:
            has_labels = False  # read_volume reports the unreadable file
        volume = read_volume(
            path, raw_key=source.raw_key, label_key=label_key if has_labels else None, padding=cfg.DATASET.PADDING
        )
        stat = path.stat()
        identity = {
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "raw_key": source.raw_key,
        }
        return volume, identity, source.open().resolution
    lazy = source.open()
    raw = np.empty(lazy.shape, dtype=lazy.dtype)
    slab = (max(1, lazy.chunks[0]),) + lazy.shape[1:]
    for box in iter_blocks(lazy.shape, slab):
        raw[box] = lazy[box]
    identity = {
        "url": lazy.url,
        "shape": list(raw.shape),
        "dtype": raw.dtype.name,
        "sha256": hashlib.sha256(raw.data).hexdigest(),
    }
    volume = Volume(raw=raw, labels=None, padding=(0, 0, 0), path=Path(source.prefix), value_range=_value_range(raw))
    return volume, identity, lazy.resolution


# ----------------------------------------------------------------------------------------- outputs


def join_store_url(base: str, name: str) -> str:
    """``<base>/<name>``: a layer inside a precomputed prefix, or an array inside a zarr group."""
    return f"{base.rstrip('/')}/{name}"


def check_store_url(url: str, flag: str, *, prefix: bool = False, overwrite: bool = True) -> None:
    """Checks an output URL before any compute.

    Args:
        url: the output (or, with ``prefix``, a folder / group of outputs).
        flag: the command-line flag, for the message.
        prefix: ``url`` holds layers ``<url>/<name>`` rather than being one.
        overwrite: allow an existing local output (else a DataError).

    Raises:
        ConfigError: not a zarr or precomputed URL.
        DataError: the output exists and ``overwrite`` is False.
    """
    target = join_store_url(url, "segmentation") if prefix else url
    try:
        parsed = parse_volume_url(target)
    except DataError:
        parsed = None
    if parsed is None or parsed.format == "hdf5":
        raise ConfigError(
            f"{flag} '{url}': give a precomputed URL (precomputed://file:///abs/path, gs://..., s3://...) "
            "or a zarr folder (x.zarr, x.zarr:group)"
        )
    if overwrite or not parsed.is_local:
        return
    local = parsed.local_path / (parsed.key or "") if parsed.format == "zarr" else parsed.local_path
    if local.exists():
        raise DataError(f"{flag} '{url}' already exists; remove it or pass --overwrite to replace it")


def _encode(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Probabilities in [0, 1] -> float32, or uint8 round(255 p) (as chunked prediction stores them)."""
    if dtype == np.uint8:
        return np.rint(np.clip(values.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(dtype, copy=False)


def _copy_layer(
    source: LazyVolume,
    url: str,
    dtype: np.dtype,
    resolution: Sequence[float],
    layer_type: Literal["image", "segmentation"],
    encode: bool,
) -> str:
    """Streams ``source`` into a new (replaced) zarr / precomputed volume, one storage chunk at a time."""
    chunks = tuple(min(64, s) for s in source.shape[-3:])
    if source.ndim == 4:
        chunks = (source.shape[0],) + chunks
    with create_volume(
        url, source.shape, dtype, chunks=chunks, resolution=resolution, layer_type=layer_type, overwrite=True
    ) as writer:
        for box in iter_blocks(writer.shape, writer.chunks):
            block = source[box]
            writer.write(box, _encode(block, dtype) if encode else block)
    return writer.url


def export_results(
    results: Sequence[VolumeResult],
    url: str,
    *,
    resolution: Sequence[float] | None = None,
    output_dtype: OutputDtype = "float32",
) -> dict[str, list[str]]:
    """Copies each volume's segmentation(s) and affinities into precomputed / zarr layers.

    One volume goes to ``<url>/segmentation`` (plus ``<url>/segmentation_t0.30`` ... for extra
    thresholds; uint64, compressed_segmentation for precomputed) and ``<url>/affinities`` (C-channel
    image). Several volumes go to ``<url>/<prefix>/...``. Existing layers are replaced, as the HDF5
    results are. Data are streamed from the HDF5 results, one storage chunk at a time.

    Args:
        results: what :func:`melecole.inference.pipeline.run_inference` returned.
        url: precomputed prefix (``precomputed://file:///abs/out``, ``gs://bucket/out``) or zarr group.
        resolution: (z, y, x) nm; default the input's resolution, else (1, 1, 1).
        output_dtype: affinities as float32 (the stored float16 values, exactly) or uint8 round(255 a).

    Returns:
        {volume name: [layer URLs written]}.
    """
    from melecole.inference.pipeline import AFFINITIES_KEY

    check_store_url(url, "--output-precomputed", prefix=True)
    dtype = np.dtype(output_dtype)
    written: dict[str, list[str]] = {}
    for result in results:
        base = url if len(results) == 1 else join_store_url(url, result.name)
        voxel_size = tuple(resolution or result.resolution or (1.0, 1.0, 1.0))
        urls = []
        for key in result.segmentation_keys:
            segmentation = open_volume(f"{result.segmentation}:{key}")
            urls.append(
                _copy_layer(
                    segmentation, join_store_url(base, key), np.dtype(np.uint64), voxel_size, "segmentation", False
                )
            )
        affinities = open_volume(f"{result.affinities}:{AFFINITIES_KEY}")
        urls.append(_copy_layer(affinities, join_store_url(base, AFFINITIES_KEY), dtype, voxel_size, "image", True))
        logger.info("%s: wrote %s", result.name, ", ".join(urls))
        written[result.name] = urls
    return written


# ------------------------------------------------------------------------------- affinities only


def exact_halo(window: Sequence[int], stride: Sequence[int]) -> list[int]:
    """Halo (z, y, x) that makes chunked prediction equal to one whole-volume ``predict_volume``.

    With blocks and halo both multiples of the stride, every padded block starts on the
    whole-volume window grid; a halo of at least one window means that every window covering a
    block voxel is a whole-volume window, with the same crop, and no window aligned to a padded
    block's end reaches the block (at the volume border the padded block ends where the volume
    does). So: the window rounded up to a multiple of the stride.
    """
    return [math.ceil(w / s) * s for w, s in zip(window, stride)]


def _storage_chunks(chunk_shape: Sequence[int]) -> list[int]:
    """Per axis the largest divisor of the block that is <= 64 (the block itself if that is < 16)."""
    storage = []
    for size in chunk_shape:
        divisor = max(d for d in range(1, min(64, size) + 1) if size % d == 0)
        storage.append(divisor if divisor >= min(16, size) else size)
    return storage


def predict_affinities_to_store(
    cfg: CN,
    checkpoint_path: str | os.PathLike,
    input_url: str | None,
    affinities_url: str | None,
    *,
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

    No mutex watershed and no HDF5 results; memory is bounded by one block plus its halo (the
    padded raw and (C + 1) float32 outputs for it), whatever the volume size. The outputs cover the
    whole raw (no DATASET.PADDING crop).

    Args:
        cfg: merged config: window / stride / margin (:func:`resolve_windows`), INFERENCE.OFFSETS,
            LOSS.DELTA_D / NORM, INFERENCE.BLENDING / BATCH_SIZE, HARDWARE.DEVICE / AMP.
        checkpoint_path: checkpoint file or run folder.
        input_url: (Z, Y, X) raw, uint8 or float in [0, 1]: HDF5, zarr or precomputed URL.
        affinities_url: zarr / precomputed output, (C, Z, Y, X) image.
        membranes_url: optional (Z, Y, X) foreground probability output (P(inside a neuron), as in
            ``*_membranes.hdf``).
        raw_key: raw dataset / array when the input URL names none (default DATASET.RAW_KEY).
        chunk_shape: output block (z, y, x), rounded up to a multiple of the stride (default
            (32, 256, 256)).
        halo: context per side (z, y, x); default :func:`exact_halo` (equal to whole-volume
            prediction). Smaller is faster; values near block borders then differ slightly.
        output_dtype: float32, or uint8 round(255 a).
        resolution: (z, y, x) nm; default the input's, else (1, 1, 1).
        overwrite: replace existing outputs (else a DataError before any compute).
        progress: tqdm bar over blocks.

    Raises:
        ConfigError: missing input / output, bad URL, halo or chunk.
        DataError: missing input, existing output, raw neither uint8 nor float.
        CheckpointError: as for :func:`run_inference`.
    """
    from melecole.engine.checkpoint import build_model_from_checkpoint
    from melecole.inference.pipeline import resolve_windows
    from melecole.io import predict_affinities_chunked

    if not input_url or not affinities_url:
        raise ConfigError("--affinities-only needs --input URL and --output-affinities URL")
    check_store_url(affinities_url, "--output-affinities", overwrite=overwrite)
    if membranes_url:
        check_store_url(membranes_url, "--output-membranes", overwrite=overwrite)
    window, stride, margin = resolve_windows(cfg)
    offsets = [list(o) for o in cfg.INFERENCE.OFFSETS]
    reach = [max(abs(int(o[axis])) for o in offsets) for axis in range(3)]
    halo = exact_halo(window, stride) if halo is None else [int(h) for h in halo]
    chunk = [math.ceil(int(c) / s) * s for c, s in zip(chunk_shape or DEFAULT_CHUNK, stride)]
    if len(halo) != 3 or any(h < r for h, r in zip(halo, reach)):
        raise ConfigError(f"--halo {halo} must be 3 values, each at least the largest |offset| {reach}")
    if len(chunk) != 3 or min(chunk) < 1:
        raise ConfigError(f"--chunk {list(chunk_shape or [])} must be 3 positive values (z, y, x)")
    source = resolve_input(input_url, raw_key or cfg.DATASET.RAW_KEY)
    volume = source.open()
    if volume.dtype != np.uint8 and not np.issubdtype(volume.dtype, np.floating):
        raise DataError(
            f"input '{volume.url}' has dtype {volume.dtype}; --affinities-only reads block by block and needs "
            "uint8 or float raw in [0, 1] (convert it, or run infer.py without --affinities-only)"
        )
    device, amp = inference_device(cfg)
    model, _, checkpoint = build_model_from_checkpoint(checkpoint_path, cfg, device=device)
    logger.info(
        "checkpoint %s on %s: %s %s -> %s in blocks %s, halo %s",
        checkpoint["path"],
        device,
        volume.url,
        volume.shape,
        affinities_url,
        chunk,
        halo,
    )
    return predict_affinities_chunked(
        model,
        volume,
        affinities_url,
        offsets=offsets,
        window=window,
        chunk_shape=chunk,
        halo=halo,
        foreground_sink=membranes_url or None,
        output_dtype=output_dtype,
        storage_chunks=_storage_chunks(chunk),
        resolution=resolution,
        overwrite=overwrite,
        progress=progress,
        **predict_options(cfg, stride, margin, device, amp),
    )
