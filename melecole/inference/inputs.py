"""Inference inputs: a split's HDF5 volumes or one volume URL (HDF5, zarr, Neuroglancer precomputed).

``infer.py --input URL`` (:func:`resolve_input`) takes a plain HDF5 file (read whole, labels and
DATASET.PADDING as for a split), ``file.hdf:key`` (the same, raw dataset ``key``), a zarr array
(``x.zarr``, ``x.zarr:key``, ``zarr://folder``) or a precomputed layer (``precomputed://file:///abs``,
``gs://...``, ...). Zarr and precomputed raw is read block by block into memory (the mutex
watershed needs the whole volume); it has no labels.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from melecole.data.volume import Volume, list_volumes, read_volume
from melecole.errors import ConfigError, DataError
from melecole.io import LazyVolume, intensity_range, iter_blocks, open_hdf5_volume, open_volume, parse_volume_url

__all__ = ["InputSource", "read_input", "resolve_input", "volume_jobs"]


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
            return open_hdf5_volume(self.hdf5_path, self.raw_key, hint="DATASET.RAW_KEY")
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
    if Path(text).is_file():  # plain HDF5 file, whatever its suffix
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


def volume_jobs(
    data_root: str | os.PathLike, split: str | None, input_path: str | os.PathLike | None, raw_key: str | None
) -> list[tuple[str, InputSource]]:
    """[(output prefix, input)]: the input URL (prefix: the split if given, else the input's name) or
    every volume of the split (prefix: the split, or <split>_<stem> when it holds several)."""
    if input_path is not None:
        source = resolve_input(input_path, raw_key)
        return [(split or source.prefix, source)]
    if split is None:
        raise ConfigError("give a split (--split) or an input file (--input)")
    sources = [InputSource(str(path), path.stem, path, raw_key) for path in list_volumes(data_root, split)]
    if len(sources) == 1:
        return [(split, sources[0])]
    return [(f"{split}_{source.prefix}", source) for source in sources]


def read_input(
    source: InputSource, label_key: str, padding: Sequence[int]
) -> tuple[Volume, dict[str, Any], tuple[float, ...] | None]:
    """Reads an input into memory.

    HDF5 inputs go through :func:`melecole.data.volume.read_volume` (labels when the file has
    ``label_key``, raw padding ``padding``); zarr / precomputed raw is read block by block (z-slabs
    of the storage chunk height), without labels.

    Returns:
        volume: the :class:`~melecole.data.volume.Volume`.
        identity: what the cached predictions depend on about the input (JSON-able): file size and
            mtime for HDF5, the raw's SHA-256 for zarr / precomputed (folders have no reliable mtime).
        resolution: (z, y, x) nm stored with the raw, or None.
    """
    if source.hdf5_path is not None:
        path = source.hdf5_path
        volume = read_volume(path, raw_key=source.raw_key, label_key=label_key, padding=padding, labels_optional=True)
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
    volume = Volume(raw=raw, labels=None, padding=(0, 0, 0), path=Path(source.prefix), value_range=intensity_range(raw))
    return volume, identity, lazy.resolution
