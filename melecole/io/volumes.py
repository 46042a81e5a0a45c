"""Opening and writing volumes by URL: HDF5, zarr and Neuroglancer precomputed (CloudVolume).

Arrays are (Z, Y, X) or channel-first (C, Z, Y, X) in every format, as everywhere in MeLeCoLe.
Reading is lazy: :func:`open_volume` returns a :class:`LazyVolume` that knows its shape and dtype and
reads voxels only when sliced. The formats themselves live in :mod:`melecole.io.formats` (one module
each, registered in ``FORMATS`` with their capabilities); this module parses URLs and dispatches.

URLs::

    file.hdf                      HDF5, the only dataset in the file (or ``default_key``)
    file.hdf:labels               HDF5 dataset ``labels`` (also .h5, .hdf5)
    out.zarr  out.zarr:raw/s0  out.zarr/raw/s0   zarr array (v2 or v3), optionally inside a group
    zarr://path/to/array          zarr, for a folder without the .zarr suffix
    precomputed://file:///abs/path   Neuroglancer precomputed via CloudVolume
    precomputed://gs://bucket/layer  (also s3://, https://; bare gs:// etc. mean precomputed)

Writers (:func:`create_volume`) exist for the writable formats (zarr and precomputed). Local outputs are
written to a temporary folder beside the target and renamed into place by :meth:`VolumeWriter.commit`,
so an interrupted write never leaves a partial volume under the final name; cloud outputs are written
in place (object stores have no rename).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.io.formats import FORMATS, VolumeFormat, volume_format
from melecole.io.formats.base import Index, LayerType, LazyVolume, VolumeSpec, VolumeWriter
from melecole.io.formats.hdf5 import HDF5_SUFFIXES, hdf5_dataset_names, open_hdf5, open_hdf5_volume

__all__ = [
    "LazyVolume",
    "VolumeWriter",
    "VolumeURL",
    "parse_volume_url",
    "open_volume",
    "create_volume",
    "write_volume",
    "iter_blocks",
    "HDF5_SUFFIXES",
    "hdf5_dataset_names",
    "open_hdf5",
    "open_hdf5_volume",
]

_CLOUD_SCHEMES = ("gs://", "s3://", "http://", "https://", "matrix://", "tigerdata://")
Format = Literal["hdf5", "zarr", "precomputed"]


# ----------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class VolumeURL:
    """A parsed volume URL.

    Attributes:
        format: a name of :data:`melecole.io.formats.FORMATS` (hdf5 | zarr | precomputed).
        path: local file / folder (hdf5, zarr) or CloudVolume cloud path (precomputed, e.g. ``file:///a/b``).
        key: dataset (hdf5) or array path inside the zarr root; None = not given.
    """

    format: Format
    path: str
    key: str | None = None

    @property
    def volume_format(self) -> VolumeFormat:
        """The registry entry of the format: its reader, writer and capabilities."""
        return volume_format(self.format)

    @property
    def is_local(self) -> bool:
        """True for local files and ``file://`` precomputed layers (they can be renamed atomically)."""
        return self.volume_format.is_local(self.path)

    @property
    def local_path(self) -> Path:
        """The local file or folder (``file://`` stripped)."""
        return self.volume_format.local_path(self.path)

    @property
    def array_path(self) -> Path:
        """The local file or folder holding the array itself (a zarr root's member folder ``key``)."""
        return self.volume_format.array_path(self.path, self.key)


def _split_key(text: str, suffixes: Sequence[str]) -> tuple[str, str | None] | None:
    """``file.hdf:key`` -> (file.hdf, key), ``root.zarr/a/b`` -> (root.zarr, a/b); None: no suffix matches."""
    head, colon, tail = text.rpartition(":")
    if colon and head.lower().endswith(tuple(suffixes)):
        return head, tail.strip("/") or None
    parts = Path(text).parts
    for index, part in enumerate(parts):
        if part.lower().endswith(tuple(suffixes)):
            root = str(Path(*parts[: index + 1]))
            rest = "/".join(parts[index + 1 :])
            return root, rest or None
    return None


def _require_absolute_file_url(url: str, cloudpath: str) -> None:
    """A ``file://`` path must be absolute (``file:///abs``): CloudVolume would silently write a
    relative one under the current directory."""
    if cloudpath.startswith("file://") and not cloudpath[len("file://") :].startswith("/"):
        relative = cloudpath[len("file://") :]
        raise DataError(
            f"volume '{url}': file:// path '{relative}' is relative (it would resolve to "
            f"'{Path(relative).resolve()}'), expected an absolute path: file:///abs/path"
        )


def _parse_scheme(text: str) -> VolumeURL | None:
    """URLs with a scheme (precomputed://, zarr://, file://, gs:// ...); None for plain paths."""
    if text.startswith("precomputed://"):
        cloudpath = text[len("precomputed://") :]
        if "://" not in cloudpath:
            cloudpath = "file://" + str(Path(cloudpath).resolve())
        _require_absolute_file_url(text, cloudpath)
        return VolumeURL("precomputed", cloudpath)
    if text.startswith(("zarr://", "zarr2://", "zarr3://")):
        rest = text.split("://", 1)[1]
        split = _split_key(rest, (".zarr",))
        if split is None:
            path, colon, key = rest.partition(":")
            return VolumeURL("zarr", path, (key.strip("/") or None) if colon else None)
        return VolumeURL("zarr", *split)
    if text.startswith("file://"):
        _require_absolute_file_url(text, text)
        return VolumeURL("precomputed", text)
    if text.startswith(_CLOUD_SCHEMES):
        if ".zarr" in text:
            raise DataError(f"volume '{text}': remote zarr is not supported; copy it locally or use precomputed")
        return VolumeURL("precomputed", text)
    return None


def parse_volume_url(url: str | os.PathLike) -> VolumeURL:
    """Parses a volume URL (see the module docstring).

    Raises:
        DataError: the format cannot be told from the URL, or a ``file://`` path is relative.
    """
    text = os.fspath(url)
    parsed = _parse_scheme(text)
    if parsed is not None:
        return parsed
    for suffixes, fmt in ((HDF5_SUFFIXES, "hdf5"), ((".zarr",), "zarr")):
        split = _split_key(text, suffixes)
        if split is not None:
            return VolumeURL(fmt, *split)  # type: ignore[arg-type]
    raise DataError(
        f"volume '{text}': unknown format; expected file.hdf[:key], file.zarr[:key], zarr://folder, "
        "or precomputed://file:///path (or gs://, s3://, https://)"
    )


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[Index]:
    """Slices of the blocks tiling ``shape`` (C order), the last block per axis clipped to the end."""
    ranges = [range(0, int(size), int(step)) for size, step in zip(shape, block)]
    for starts in itertools.product(*ranges):
        yield tuple(
            slice(start, min(start + int(step), int(size))) for start, step, size in zip(starts, block, shape)
        )


# ------------------------------------------------------------------------------- read and write


def open_volume(url: str | os.PathLike, default_key: str | None = None) -> LazyVolume:
    """Opens a volume lazily (nothing is read until it is sliced).

    Args:
        url: see the module docstring (HDF5, zarr, precomputed).
        default_key: HDF5 dataset / zarr array used when the URL names none and the file holds
            several; a file holding a single dataset opens that one.

    Raises:
        DataError: missing file or layer, unknown format, or no unambiguous dataset.
    """
    parsed = parse_volume_url(url)
    return parsed.volume_format.open(parsed.path, parsed.key, default_key)


def _spec(
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None,
    resolution: Sequence[float],
    layer_type: LayerType,
    overwrite: bool,
    zarr_format: Literal[2, 3],
) -> VolumeSpec:
    """Checks and completes :func:`create_volume`'s arguments (ValueError for shapes that do not fit)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"volumes are (Z, Y, X) or (C, Z, Y, X); got shape {shape}")
    if len(resolution) != 3:
        raise ValueError(f"resolution is (z, y, x) in nm; got {list(resolution)}")
    if chunks is None:
        chunks = tuple(min(64, s) for s in shape[-3:])
        if len(shape) == 4:
            chunks = (shape[0],) + chunks
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or min(chunks) < 1:
        raise ValueError(f"chunks {chunks} do not fit shape {shape}")
    return VolumeSpec(
        shape, np.dtype(dtype), chunks, tuple(resolution), layer_type, overwrite, zarr_format  # type: ignore[arg-type]
    )


def create_volume(
    url: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    *,
    chunks: Sequence[int] | None = None,
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
    layer_type: LayerType = "image",
    overwrite: bool = False,
    zarr_format: Literal[2, 3] = 2,
) -> VolumeWriter:
    """Creates an empty volume of a writable format (zarr, precomputed) to fill block by block.

    Args:
        url: ``out.zarr``, ``out.zarr:key``, ``zarr://folder`` or ``precomputed://file:///abs/path``
            (cloud paths are written in place, not atomically). HDF5 output: use
            :func:`melecole.io.hdf5_output.create_hdf5`.
        shape: (Z, Y, X), or (C, Z, Y, X) for channels (affinities).
        dtype: e.g. uint8 / float32 images, uint32 / uint64 segmentations.
        chunks: storage chunks in the same order; default (64, 64, 64) clipped to the shape, all
            channels in one chunk.
        resolution: (z, y, x) voxel size in nm (stored in the precomputed info / zarr attributes).
        layer_type: image | segmentation; precomputed segmentations use compressed_segmentation.
        overwrite: replace an existing output when committing (else a DataError now).
        zarr_format: 2 (readable by every zarr library) or 3.

    Returns:
        A :class:`VolumeWriter`; call ``commit()`` (or use ``with``) to publish the volume.
    """
    parsed = parse_volume_url(url)
    spec = _spec(shape, dtype, chunks, resolution, layer_type, overwrite, zarr_format)
    entry = parsed.volume_format
    if entry.create is None:
        writable = ", ".join(sorted(name for name, other in FORMATS.items() if other.writable))
        raise DataError(f"cannot create '{url}': writers exist for {writable} (write HDF5 with create_hdf5)")
    return entry.create(parsed.path, parsed.key, spec)


def write_volume(
    url: str | os.PathLike,
    data: Any,
    *,
    chunks: Sequence[int] | None = None,
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
    layer_type: LayerType = "image",
    overwrite: bool = False,
    zarr_format: Literal[2, 3] = 2,
) -> None:
    """Writes a whole array (numpy or :class:`LazyVolume`) block by block; see :func:`create_volume`."""
    with create_volume(
        url,
        data.shape,
        data.dtype,
        chunks=chunks,
        resolution=resolution,
        layer_type=layer_type,
        overwrite=overwrite,
        zarr_format=zarr_format,
    ) as writer:
        for box in iter_blocks(writer.shape, writer.chunks):
            writer.write(box, np.asarray(data[box]))
