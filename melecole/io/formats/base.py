"""What every volume format shares: the lazy volume and the writer it returns, and its registry entry.

Arrays are (Z, Y, X) or channel-first (C, Z, Y, X) in every format. A format module
(:mod:`melecole.io.formats.hdf5`, ``zarr``, ``precomputed``) reads into a :class:`LazyVolume` and
writes through a :class:`VolumeWriter`; its :class:`VolumeFormat` entry says what it can do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.utils.files import remove_path, replace_folder

__all__ = [
    "Index",
    "LayerType",
    "LazyVolume",
    "VolumeFormat",
    "VolumeSpec",
    "VolumeWriter",
    "check_target",
    "normalise_index",
    "own_mark",
    "resolution_attribute",
]

LayerType = Literal["image", "segmentation"]
Index = tuple[slice, ...]


def normalise_index(item: Any, shape: Sequence[int]) -> tuple[Index, tuple[int, ...]]:
    """Basic index -> (full slices with step 1, axes to drop because they were integers).

    Raises:
        IndexError: steps other than 1, fancy indexing, or out-of-range integers.
    """
    if not isinstance(item, tuple):
        item = (item,)
    if any(part is Ellipsis for part in item):
        where = next(i for i, part in enumerate(item) if part is Ellipsis)
        fill = (slice(None),) * (len(shape) - len(item) + 1)
        item = item[:where] + fill + item[where + 1 :]
    if len(item) > len(shape):
        raise IndexError(f"too many indices ({len(item)}) for a volume of {len(shape)} axes")
    item = item + (slice(None),) * (len(shape) - len(item))
    slices: list[slice] = []
    dropped: list[int] = []
    for axis, (part, size) in enumerate(zip(item, shape)):
        if isinstance(part, (int, np.integer)):
            index = int(part) + size if part < 0 else int(part)
            if not 0 <= index < size:
                raise IndexError(f"index {part} out of range for axis {axis} of size {size}")
            slices.append(slice(index, index + 1))
            dropped.append(axis)
        elif isinstance(part, slice):
            start, stop, step = part.indices(size)
            if step != 1:
                raise IndexError("lazy volumes support only slices with step 1; read, then subsample")
            slices.append(slice(start, max(start, stop)))
        else:
            raise IndexError(f"lazy volumes support integers and slices, got {type(part).__name__}")
    return tuple(slices), tuple(dropped)


class LazyVolume:
    """A volume whose voxels are read on demand; numpy-like enough for viewers and chunked loops.

    Attributes:
        shape: (Z, Y, X) or (C, Z, Y, X).
        dtype: numpy dtype of what :meth:`read` returns.
        chunks: storage chunk shape in the same axis order (reads aligned to it are cheapest).
        url: where it was opened from.
        resolution: (z, y, x) voxel size in nm when the format stores it, else None.
    """

    def __init__(
        self,
        reader: Callable[[Index], np.ndarray],
        shape: Sequence[int],
        dtype: Any,
        *,
        chunks: Sequence[int] | None = None,
        url: str = "",
        resolution: Sequence[float] | None = None,
    ):
        self._reader = reader
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(c) for c in chunks) if chunks is not None else self.shape
        self.url = url
        self.resolution = tuple(float(r) for r in resolution) if resolution is not None else None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyVolume({self.url!r}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunks})"

    def read(self, slices: Any = None) -> np.ndarray:
        """Reads a box: ``slices`` is a basic index (slices with step 1 and integers); None = everything."""
        return self[() if slices is None else slices]

    def __getitem__(self, item: Any) -> np.ndarray:
        slices, dropped = normalise_index(item, self.shape)
        if any(s.stop <= s.start for s in slices):
            data = np.zeros(tuple(s.stop - s.start for s in slices), dtype=self.dtype)
        else:
            data = np.asarray(self._reader(slices))
            if data.dtype != self.dtype:
                data = data.astype(self.dtype)
        return (
            data.reshape(tuple(n for a, n in enumerate(data.shape) if a not in dropped)) if dropped else data
        )

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = self.read()
        return data if dtype is None else data.astype(dtype, copy=False)

    def crop(self, slices: Any) -> LazyVolume:
        """A lazy window onto this volume (no data is read)."""
        window, dropped = normalise_index(slices, self.shape)
        if dropped:
            raise IndexError("crop() takes slices, not integers")

        def reader(inner: Index) -> np.ndarray:
            return self._reader(
                tuple(slice(w.start + s.start, w.start + s.stop) for w, s in zip(window, inner))
            )

        return LazyVolume(
            reader,
            [s.stop - s.start for s in window],
            self.dtype,
            chunks=self.chunks,
            url=self.url,
            resolution=self.resolution,
        )

    def astype(self, dtype: Any) -> LazyVolume:
        """A lazy view that casts on read."""
        return LazyVolume(
            self._reader, self.shape, dtype, chunks=self.chunks, url=self.url, resolution=self.resolution
        )


def resolution_attribute(attributes: Any) -> tuple[float, ...] | None:
    """The (z, y, x) ``resolution`` attribute of a dataset / array (the last three values), else None."""
    value = attributes.get("resolution") if hasattr(attributes, "get") else None
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    return tuple(float(v) for v in value[-3:]) if value.size >= 3 else None


class VolumeWriter:
    """A volume being written; data goes to a temporary folder until :meth:`commit`.

    Use as a context manager: it commits when the block succeeds and removes the temporary folder
    when it fails. Index like an array, ``writer[z0:z1, y0:y1, x0:x1] = block`` (channel-first
    volumes take ``writer[:, z0:z1, ...]``); precomputed writes must be aligned to ``chunks``
    (or end at the volume border).
    """

    def __init__(
        self,
        url: str,
        shape: Sequence[int],
        dtype: Any,
        chunks: Sequence[int],
        setter: Callable[[Index, np.ndarray], None],
        temporary: Path | None,
        final: Path | None,
        finish: Callable[[], None] | None = None,
    ):
        self.url = url
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(c) for c in chunks)
        self._setter = setter
        self._temporary = temporary
        self._final = final
        self._finish = finish
        self.committed = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def write(self, slices: Any, data: np.ndarray) -> None:
        """Writes ``data`` (shape of the box ``slices`` selects) into the volume."""
        index, dropped = normalise_index(slices, self.shape)
        if dropped:
            raise IndexError("write() takes slices, not integers")
        expected = tuple(s.stop - s.start for s in index)
        data = np.asarray(data)
        if data.shape != expected:
            raise ValueError(f"{self.url}: block of shape {data.shape} does not fit the box {expected}")
        self._setter(index, np.ascontiguousarray(data.astype(self.dtype, copy=False)))

    __setitem__ = write

    def commit(self) -> None:
        """Makes the volume visible under its final name (rename of the temporary folder)."""
        if self.committed:
            return
        if self._finish is not None:
            self._finish()
        if self._temporary is not None and self._final is not None:
            self._final.parent.mkdir(parents=True, exist_ok=True)
            replace_folder(self._temporary, self._final)
        self.committed = True

    def abort(self) -> None:
        """Removes the temporary folder (nothing under the final name changes)."""
        if self._temporary is not None and self._temporary.exists():
            remove_path(self._temporary)

    def __enter__(self) -> VolumeWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def check_target(final: Path, overwrite: bool, url: str) -> None:
    """An existing output is replaced only with ``overwrite`` and only when MeLeCoLe wrote it."""
    from melecole.io.ownership import check_replaceable

    if os.path.lexists(final) and not overwrite:
        raise DataError(f"output '{url}' already exists; remove it or pass overwrite=True")
    check_replaceable(final, f"output '{url}'")


def own_mark(layer_type: LayerType) -> dict[str, Any]:
    """MeLeCoLe's mark, written into the attributes / info of every zarr and precomputed output."""
    from melecole.io.ownership import own_attributes

    return own_attributes(layer_type)


@dataclass(frozen=True)
class VolumeSpec:
    """What :func:`melecole.io.create_volume` creates (validated there).

    Attributes:
        shape: (Z, Y, X) or (C, Z, Y, X).
        dtype: the stored dtype.
        chunks: storage chunks in the same order.
        resolution: (z, y, x) voxel size in nm.
        layer_type: image | segmentation.
        overwrite: replace an existing output when committing (else a DataError now).
        zarr_format: 2 or 3 (zarr only).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    resolution: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layer_type: LayerType = "image"
    overwrite: bool = False
    zarr_format: Literal[2, 3] = 2


@dataclass(frozen=True)
class VolumeFormat:
    """A volume format of the registry (:data:`melecole.io.formats.FORMATS`): reader, writer, capabilities.

    Attributes:
        name: the registry name (``VolumeURL.format``).
        summary: one line: which URLs and what it stores.
        open: ``open(path, key, default_key) -> LazyVolume`` (lazy; DataError for a missing store or key).
        create: ``create(path, key, spec) -> VolumeWriter``; None: the format has no writer (read-only).
        has_keys: one store holds several arrays, named by a key (``file.hdf:key``, ``out.zarr:key``).
        keys_are_folders: a key names a folder inside the store (zarr groups): that folder is the array's
            location, and writing it creates the groups on the way.
        local_prefix: the prefix of local paths ("" = every path is local; precomputed: ``file://``); other
            paths are remote (object stores: written in place, never renamed).
        modules: the third-party modules its reader and writer import (lazily, on first use).
    """

    name: str
    summary: str
    open: Callable[[str, str | None, str | None], LazyVolume]
    create: Callable[[str, str | None, VolumeSpec], VolumeWriter] | None = None
    has_keys: bool = False
    keys_are_folders: bool = False
    local_prefix: str = ""
    modules: tuple[str, ...] = ()

    @property
    def writable(self) -> bool:
        """True when :func:`melecole.io.create_volume` can write this format."""
        return self.create is not None

    def is_local(self, path: str) -> bool:
        """True for a path on this machine's file system."""
        return path.startswith(self.local_prefix)

    def is_renamable(self, path: str) -> bool:
        """True when an output at ``path`` is written to a temporary beside it and renamed into place
        (atomic): local outputs of a writable format; remote ones are written in place."""
        return self.writable and self.is_local(path)

    def local_path(self, path: str) -> Path:
        """The local file or folder of ``path`` (``local_prefix`` stripped).

        Raises:
            DataError: a remote path.
        """
        if not self.is_local(path):
            raise DataError(f"'{path}' is not a local path")
        return Path(path[len(self.local_prefix) :])

    def array_path(self, path: str, key: str | None) -> Path:
        """The local file or folder holding the array ``key`` of the store at ``path``."""
        root = self.local_path(path)
        return root / key if key and self.keys_are_folders else root
