"""HDF5 volumes (h5py): ``file.hdf`` (the only dataset, or a default key) or ``file.hdf:key``.

Read-only as a volume format (no :func:`melecole.io.create_volume` writer): MeLeCoLe writes its HDF5
result files whole with :func:`melecole.io.hdf5_output.create_hdf5` (atomic, safe on a full disk).
This is the one HDF5 reader of MeLeCoLe: :func:`open_hdf5` for a file, :func:`open_hdf5_volume` for one
dataset, :func:`hdf5_dataset_names` for its keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from melecole.errors import DataError
from melecole.io.formats.base import Index, LazyVolume, VolumeFormat, resolution_attribute

__all__ = [
    "FORMAT",
    "HDF5_SUFFIXES",
    "hdf5_dataset_names",
    "open_hdf5",
    "open_hdf5_volume",
]

HDF5_SUFFIXES = (".hdf", ".h5", ".hdf5")


def open_hdf5(path: str | os.PathLike, role: str = "file") -> Any:
    """Opens an HDF5 file for reading (h5py.File); a missing or non-HDF5 file is a one-line DataError.

    ``role`` names the file in the message (e.g. "ground truth file").
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} '{path}' does not exist")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"{role} '{path}' is not a readable HDF5 file") from None


def _dataset_names(handle: Any) -> list[str]:
    import h5py

    names: list[str] = []
    handle.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
    return names


def hdf5_dataset_names(path: str | os.PathLike, role: str = "file") -> list[str]:
    """Paths of every dataset in an HDF5 file (one-line DataError for a missing / unreadable file)."""
    with open_hdf5(path, role=role) as handle:
        return _dataset_names(handle)


def _choose_key(
    path: Path, datasets: list[str], key: str | None, default_key: str | None, hint: str | None, role: str
) -> str:
    """The dataset to open: ``key``, else ``default_key`` if present, else the only one (DataError otherwise)."""
    listed = ", ".join(sorted(datasets)) or "none"
    where = f" ({hint})" if hint else ""
    if key is None:
        if default_key is not None and default_key in datasets:
            key = default_key
        elif len(datasets) == 1:
            key = datasets[0]
        else:
            wanted = f"key '{default_key}'{where} not found and " if default_key else ""
            raise DataError(
                f"{role} '{path}': {wanted}the file has {len(datasets)} datasets ({listed}); name one as {path}:KEY"
            )
    if key not in datasets:
        raise DataError(f"{role} '{path}': key '{key}' not found{where}; the file has keys: {listed}")
    return key


def open_hdf5_volume(
    path: str | os.PathLike,
    key: str | None = None,
    *,
    default_key: str | None = None,
    hint: str | None = None,
    role: str = "file",
) -> LazyVolume:
    """Opens one HDF5 dataset lazily: the one HDF5 reader of MeLeCoLe (any file suffix).

    Args:
        path: the file.
        key: the dataset; None = ``default_key`` if the file has it, else the file's only dataset.
        default_key: see ``key``.
        hint: what chooses the key (a config field or flag, e.g. "DATASET.RAW_KEY"), named in errors.
        role: names the file in errors ("file", "ground truth file", ...).

    Raises:
        DataError: missing or unreadable file, missing key (the message lists the datasets), or no
            unambiguous dataset.
    """
    import h5py

    path = Path(path)
    with open_hdf5(path, role=role) as handle:
        key = _choose_key(path, _dataset_names(handle), key, default_key, hint, role)
        node = handle[key]
        shape, dtype = node.shape, node.dtype
        chunks = node.chunks or shape
        resolution = resolution_attribute(node.attrs)
    where = f" ({hint})" if hint else ""

    def reader(slices: Index) -> np.ndarray:
        # One open per read: no file handle outlives a call, and reads from server threads are safe.
        try:
            with h5py.File(path, "r") as file:
                return file[key][slices]
        except (OSError, RuntimeError) as error:  # h5py raises these for corrupt / truncated data
            raise DataError(f"{role} '{path}': cannot read '{key}'{where}: {error}") from None

    return LazyVolume(reader, shape, dtype, chunks=chunks, url=f"{path}:{key}", resolution=resolution)


def _open(path: str, key: str | None, default_key: str | None) -> LazyVolume:
    return open_hdf5_volume(path, key, default_key=default_key)


FORMAT = VolumeFormat(
    name="hdf5",
    summary="HDF5 file (file.hdf, file.hdf:key; also .h5, .hdf5), read-only",
    open=_open,
    has_keys=True,
    modules=("h5py",),
)
