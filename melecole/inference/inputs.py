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
from melecole.io import (
    LazyVolume,
    check_finite,
    intensity_range,
    iter_blocks,
    open_hdf5_volume,
    open_volume,
    parse_volume_url,
)

__all__ = ["InputSource", "raw_identity", "read_input", "resolve_input", "volume_jobs"]


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
        if "file://" not in text and not Path(text).exists():  # file:// errors say what is wrong
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
    if min(volume.shape) < 1:
        raise DataError(f"input '{volume.url}': raw of shape {volume.shape}, expected a non-empty (Z, Y, X) volume")
    return source


def _split_prefixes(split: str, paths: Sequence[Path]) -> list[str]:
    """``<split>_<stem>`` per file; files whose stems collide (vol.hdf, vol.h5) keep their suffix
    (``<split>_vol_hdf``, ``<split>_vol_h5``).

    Raises:
        DataError: two files still get the same name.
    """
    stems = [path.stem for path in paths]
    names = [
        _sanitise(f"{path.stem}_{path.suffix.lstrip('.')}") if stems.count(path.stem) > 1 else path.stem
        for path in paths
    ]
    prefixes = [f"{split}_{name}" for name in names]
    for index, prefix in enumerate(prefixes):
        if prefixes.index(prefix) != index:
            first = paths[prefixes.index(prefix)]
            raise DataError(
                f"split '{split}': '{first.name}' and '{paths[index].name}' would both write {prefix}_*.hdf, "
                "expected volumes with distinct names (rename one)"
            )
    return prefixes


def volume_jobs(
    data_root: str | os.PathLike, split: str | None, input_path: str | os.PathLike | None, raw_key: str | None
) -> list[tuple[str, InputSource]]:
    """[(output prefix, input)]: the input URL (prefix: the split if given, else the input's name) or
    every volume of the split (prefix: the split, or <split>_<stem> when it holds several; stems
    that collide keep their suffix)."""
    if input_path is not None:
        source = resolve_input(input_path, raw_key)
        return [(split or source.prefix, source)]
    if split is None:
        raise ConfigError("give a split (--split) or an input file (--input)")
    paths = list_volumes(data_root, split)
    sources = [InputSource(str(path), path.stem, path, raw_key) for path in paths]
    if len(sources) == 1:
        return [(split, sources[0])]
    return list(zip(_split_prefixes(split, paths), sources))


def raw_identity(raw: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and SHA-256 of a (Z, Y, X) raw's bytes (C order): the content part of a cache key."""
    digest = hashlib.sha256()
    contiguous = np.ascontiguousarray(raw)
    flat = contiguous.reshape(-1).view(np.uint8) if contiguous.size else contiguous.reshape(-1)
    step = 1 << 26  # 64 MiB at a time: no copy of the whole volume
    for start in range(0, flat.size, step):
        digest.update(flat[start : start + step].data)
    return {"shape": list(raw.shape), "dtype": raw.dtype.name, "sha256": digest.hexdigest()}


def read_input(
    source: InputSource, label_key: str, padding: Sequence[int]
) -> tuple[Volume, dict[str, Any], tuple[float, ...] | None]:
    """Reads an input into memory.

    HDF5 inputs go through :func:`melecole.data.volume.read_volume` (labels when the file has
    ``label_key``, raw padding ``padding``); zarr / precomputed raw is read block by block (z-slabs
    of the storage chunk height), without labels.

    Returns:
        volume: the :class:`~melecole.data.volume.Volume`.
        identity: what the cached predictions depend on about the input (JSON-able): the SHA-256
            of the raw's bytes with its shape and dtype (size and mtime would miss a same-size
            replacement whose mtime was restored), and where it came from.
        resolution: (z, y, x) nm stored with the raw, or None.
    """
    if source.hdf5_path is not None:
        path = source.hdf5_path
        volume = read_volume(
            path,
            raw_key=source.raw_key,
            label_key=label_key,
            padding=padding,
            labels_optional=True,
            warn_unlabelled=False,  # the pipeline says so once the outputs are written
        )
        identity = {"path": str(path.resolve()), "raw_key": source.raw_key, **raw_identity(volume.raw)}
        return volume, identity, source.open().resolution
    lazy = source.open()
    raw = np.empty(lazy.shape, dtype=lazy.dtype)
    slab = (max(1, lazy.chunks[0]),) + lazy.shape[1:]
    for box in iter_blocks(lazy.shape, slab):
        raw[box] = lazy[box]
    check_finite(raw, f"input '{lazy.url}'")
    identity = {"url": lazy.url, **raw_identity(raw)}
    volume = Volume(raw=raw, labels=None, padding=(0, 0, 0), path=Path(source.prefix), value_range=intensity_range(raw))
    return volume, identity, lazy.resolution
