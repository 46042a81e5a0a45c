"""Inference outputs beyond HDF5 files: zarr and Neuroglancer precomputed (CloudVolume) layers.

- :func:`check_store_url`: checks an output URL before any compute.
- :func:`export_results`: after a normal run, the segmentation(s) and affinities as layers
  ``<URL>/segmentation`` (compressed_segmentation for precomputed) and ``<URL>/affinities``
  (C-channel image), streamed block by block from the HDF5 results.

Chunked affinity prediction to a store (``infer.py --affinities-only``) is
:mod:`melecole.inference.chunked`; inputs are :mod:`melecole.inference.inputs`.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import numpy as np

from melecole.errors import ConfigError, DataError
from melecole.inference.outputs import AFFINITIES_KEY, VolumeResult
from melecole.io import (
    LazyVolume,
    check_writable_folder,
    create_volume,
    iter_blocks,
    open_volume,
    output_error,
    parse_volume_url,
)
from melecole.io.codec import encode_probabilities

__all__ = ["check_store_url", "export_results", "join_store_url"]

logger = logging.getLogger(__name__)

OutputDtype = Literal["float32", "uint8"]


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
        DataError: the output exists and ``overwrite`` is False, or its local folder cannot be
            written (a file in the path, no permission).
    """
    target = join_store_url(url, "segmentation") if prefix else url
    try:
        parsed = parse_volume_url(target)
    except DataError as error:
        if "file://" in target:  # a relative file:// path: say where it would go
            raise DataError(f"{flag}: {error}") from None
        parsed = None
    if parsed is None or not parsed.volume_format.writable:
        raise ConfigError(
            f"{flag} '{url}': give a precomputed URL (precomputed://file:///abs/path, gs://..., s3://...) "
            "or a zarr folder (x.zarr, x.zarr:group)"
        )
    if not parsed.is_local:
        return
    local = parsed.array_path
    if not overwrite and local.exists():
        raise DataError(f"{flag} '{url}' already exists; remove it or pass --overwrite to replace it")
    check_writable_folder(local.parent, f"{flag} '{url}'")


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
    try:
        with create_volume(
            url, source.shape, dtype, chunks=chunks, resolution=resolution, layer_type=layer_type, overwrite=True
        ) as writer:  # a failed write removes the temporary folder
            for box in iter_blocks(writer.shape, writer.chunks):
                block = source[box]
                writer.write(box, encode_probabilities(block, dtype) if encode else block)
    except OSError as error:  # full disk, quota, permission: one line
        raise output_error(url, error) from None
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
