"""Opening and writing volumes by URL: HDF5, zarr and Neuroglancer precomputed (CloudVolume).

Arrays are (Z, Y, X) or channel-first (C, Z, Y, X) in every format, as everywhere in MeLeCoLe
(CloudVolume's own (x, y, z, c) order is converted here). Reading is lazy: :func:`open_volume`
returns a :class:`LazyVolume` that knows its shape and dtype and reads voxels only when sliced.

URLs::

    file.hdf                      HDF5, the only dataset in the file (or ``default_key``)
    file.hdf:labels               HDF5 dataset ``labels`` (also .h5, .hdf5)
    out.zarr  out.zarr:raw/s0  out.zarr/raw/s0   zarr array (v2 or v3), optionally inside a group
    zarr://path/to/array          zarr, for a folder without the .zarr suffix
    precomputed://file:///abs/path   Neuroglancer precomputed via CloudVolume
    precomputed://gs://bucket/layer  (also s3://, https://; bare gs:// etc. mean precomputed)

Writers (:func:`create_volume`) exist for zarr and precomputed. Local outputs are written to a
temporary folder beside the target and renamed into place by :meth:`VolumeWriter.commit`, so an
interrupted write never leaves a partial volume under the final name; cloud outputs are written
in place (object stores have no rename).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from melecole.errors import DataError

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

HDF5_SUFFIXES = (".hdf", ".h5", ".hdf5")
_CLOUD_SCHEMES = ("gs://", "s3://", "http://", "https://", "matrix://", "tigerdata://")
Format = Literal["hdf5", "zarr", "precomputed"]
LayerType = Literal["image", "segmentation"]
Index = tuple[slice, ...]


# ----------------------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class VolumeURL:
    """A parsed volume URL.

    Attributes:
        format: hdf5 | zarr | precomputed.
        path: local file / folder (hdf5, zarr) or CloudVolume cloud path (precomputed, e.g. ``file:///a/b``).
        key: dataset (hdf5) or array path inside the zarr root; None = not given.
    """

    format: Format
    path: str
    key: str | None = None

    @property
    def is_local(self) -> bool:
        """True for local files and ``file://`` precomputed layers (they can be renamed atomically)."""
        return self.format != "precomputed" or self.path.startswith("file://")

    @property
    def local_path(self) -> Path:
        """The local file or folder (``file://`` stripped)."""
        if self.format == "precomputed":
            if not self.path.startswith("file://"):
                raise DataError(f"'{self.path}' is not a local path")
            return Path(self.path[len("file://") :])
        return Path(self.path)


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


def parse_volume_url(url: str | os.PathLike) -> VolumeURL:
    """Parses a volume URL (see the module docstring).

    Raises:
        DataError: the format cannot be told from the URL, or a ``file://`` path is relative.
    """
    text = os.fspath(url)
    if text.startswith("precomputed://"):
        cloudpath = text[len("precomputed://") :]
        if "://" not in cloudpath:
            cloudpath = "file://" + str(Path(cloudpath).resolve())
        _require_absolute_file_url(text, cloudpath)
        return VolumeURL("precomputed", cloudpath)
    if text.startswith("zarr://") or text.startswith("zarr2://") or text.startswith("zarr3://"):
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
            raise DataError(
                f"volume '{text}': remote zarr is not supported; copy it locally or use precomputed"
            )
        return VolumeURL("precomputed", text)
    for suffixes, fmt in ((HDF5_SUFFIXES, "hdf5"), ((".zarr",), "zarr")):
        split = _split_key(text, suffixes)
        if split is not None:
            return VolumeURL(fmt, *split)  # type: ignore[arg-type]
    raise DataError(
        f"volume '{text}': unknown format; expected file.hdf[:key], file.zarr[:key], zarr://folder, "
        "or precomputed://file:///path (or gs://, s3://, https://)"
    )


# ------------------------------------------------------------------------------------- indexing


def _normalise_index(item: Any, shape: Sequence[int]) -> tuple[Index, tuple[int, ...]]:
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


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[Index]:
    """Slices of the blocks tiling ``shape`` (C order), the last block per axis clipped to the end."""
    ranges = [range(0, int(size), int(step)) for size, step in zip(shape, block)]
    for starts in itertools.product(*ranges):
        yield tuple(
            slice(start, min(start + int(step), int(size))) for start, step, size in zip(starts, block, shape)
        )


# --------------------------------------------------------------------------------- lazy volumes


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
        slices, dropped = _normalise_index(item, self.shape)
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
        window, dropped = _normalise_index(slices, self.shape)
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


def _resolution_attribute(attributes: Any) -> tuple[float, ...] | None:
    value = attributes.get("resolution") if hasattr(attributes, "get") else None
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    return tuple(float(v) for v in value[-3:]) if value.size >= 3 else None


def open_hdf5(path: str | os.PathLike, role: str = "file"):
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
        datasets = _dataset_names(handle)
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
                    f"{role} '{path}': {wanted}the file has {len(datasets)} datasets ({listed}); "
                    f"name one as {path}:KEY"
                )
        if key not in datasets:
            raise DataError(f"{role} '{path}': key '{key}' not found{where}; the file has keys: {listed}")
        node = handle[key]
        shape, dtype = node.shape, node.dtype
        chunks = node.chunks or shape
        resolution = _resolution_attribute(node.attrs)

    def reader(slices: Index) -> np.ndarray:
        # One open per read: no file handle outlives a call, and reads from server threads are safe.
        try:
            with h5py.File(path, "r") as file:
                return file[key][slices]
        except (OSError, RuntimeError) as error:  # h5py raises these for corrupt / truncated data
            raise DataError(f"{role} '{path}': cannot read '{key}'{where}: {error}") from None

    return LazyVolume(reader, shape, dtype, chunks=chunks, url=f"{path}:{key}", resolution=resolution)


def _open_hdf5(parsed: VolumeURL, default_key: str | None) -> LazyVolume:
    return open_hdf5_volume(parsed.path, parsed.key, default_key=default_key)


def _zarr_major() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def _zarr_arrays(group: Any, prefix: str = "") -> list[str]:
    """Paths of every array below ``group`` (zarr-python 2 and 3 both have arrays() and groups())."""
    names = [f"{prefix}{name}" for name, _ in group.arrays()]
    for name, member in group.groups():
        names.extend(_zarr_arrays(member, f"{prefix}{name}/"))
    return names


def _open_zarr(parsed: VolumeURL, default_key: str | None) -> LazyVolume:
    import zarr

    root = Path(parsed.path)
    if not root.exists():
        raise DataError(f"zarr '{root}' does not exist")
    try:
        node = zarr.open(store=str(root), mode="r")
    except Exception as error:  # zarr raises several types for a folder that is not zarr
        raise DataError(f"'{root}' is not a readable zarr array or group ({error})") from None
    key = parsed.key
    if isinstance(node, zarr.Group):
        arrays = _zarr_arrays(node)
        if key is None:
            if default_key is not None and default_key in arrays:
                key = default_key
            elif len(arrays) == 1:
                key = arrays[0]
            else:
                raise DataError(
                    f"zarr '{root}' holds {len(arrays)} arrays ({', '.join(sorted(arrays)) or 'none'}); "
                    f"name one as {root}:KEY"
                )
        if key not in arrays:
            raise DataError(
                f"zarr '{root}': array '{key}' not found; it holds: {', '.join(sorted(arrays)) or 'none'}"
            )
        array = node[key]
    elif key is not None:
        raise DataError(f"zarr '{root}' is an array, not a group; it has no member '{key}'")
    else:
        array = node
    url = f"{root}:{key}" if key else str(root)
    return LazyVolume(
        lambda slices: array[slices],
        array.shape,
        array.dtype,
        chunks=array.chunks,
        url=url,
        resolution=_resolution_attribute(array.attrs),
    )


class _MissingCredentialsError(Exception):
    """No credentials for a gs:// bucket (found before CloudVolume tries to connect)."""


def _is_credentials_error(error: BaseException) -> bool:
    """google-auth's DefaultCredentialsError, botocore's NoCredentialsError and the like."""
    kind = type(error)
    return "Credentials" in kind.__name__ or kind.__module__.startswith("google.auth")


def _cloudvolume(factory: Callable[..., Any], cloudpath: str, **kwargs: Any) -> Any:
    """``CloudVolume(cloudpath, **kwargs)``; missing cloud credentials become a one-line DataError
    (CloudVolume's own multi-line credential notices on stdout are dropped)."""
    scheme = cloudpath.split("://", 1)[0]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if scheme == "gs":  # without credentials CloudFiles retries for ~15 s before it fails
                from cloudfiles.secrets import google_credentials

                bucket = cloudpath[len("gs://") :].split("/", 1)[0]
                if google_credentials(bucket)[1] is None:
                    raise _MissingCredentialsError()
            return factory(cloudpath, **kwargs)
    except Exception as error:
        if not _is_credentials_error(error):
            raise
        raise DataError(
            f"precomputed layer '{cloudpath}': credentials for {scheme}:// are missing, "
            "expected credentials (~/.cloudvolume/secrets/, GOOGLE_APPLICATION_CREDENTIALS or AWS keys)"
        ) from None


def _open_precomputed(parsed: VolumeURL) -> LazyVolume:
    from cloudvolume import CloudVolume
    from cloudvolume.exceptions import InfoUnavailableError

    if parsed.is_local and not (parsed.local_path / "info").is_file():
        raise DataError(f"precomputed layer '{parsed.path}' does not exist (no 'info' file)")
    try:
        volume = _cloudvolume(CloudVolume, parsed.path, progress=False, fill_missing=False, cache=False)
    except InfoUnavailableError:
        raise DataError(f"precomputed layer '{parsed.path}' has no readable 'info' file") from None
    x, y, z = (int(v) for v in volume.shape[:3])
    channels = int(volume.num_channels)
    offset = [int(v) for v in volume.voxel_offset]  # (x, y, z)
    chunk_x, chunk_y, chunk_z = (int(v) for v in volume.chunk_size)
    shape: tuple[int, ...] = (z, y, x) if channels == 1 else (channels, z, y, x)
    chunks: tuple[int, ...] = (
        (chunk_z, chunk_y, chunk_x) if channels == 1 else (channels, chunk_z, chunk_y, chunk_x)
    )

    def reader(slices: Index) -> np.ndarray:
        spatial = slices[-3:]
        channel = slices[0] if channels > 1 else slice(0, 1)
        box = volume[
            spatial[2].start + offset[0] : spatial[2].stop + offset[0],
            spatial[1].start + offset[1] : spatial[1].stop + offset[1],
            spatial[0].start + offset[2] : spatial[0].stop + offset[2],
            channel.start : channel.stop,
        ]
        data = np.asarray(box).transpose(3, 2, 1, 0)  # (x, y, z, c) -> (c, z, y, x)
        return np.ascontiguousarray(data[0] if channels == 1 else data)

    resolution = tuple(float(r) for r in volume.resolution[::-1])
    return LazyVolume(
        reader, shape, volume.dtype, chunks=chunks, url=f"precomputed://{parsed.path}", resolution=resolution
    )


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
    if parsed.format == "hdf5":
        return _open_hdf5(parsed, default_key)
    if parsed.format == "zarr":
        return _open_zarr(parsed, default_key)
    return _open_precomputed(parsed)


# -------------------------------------------------------------------------------------- writers


def _temporary_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def _replace_folder(temporary: Path, final: Path) -> None:
    """Moves ``temporary`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(temporary, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        index, dropped = _normalise_index(slices, self.shape)
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
            _replace_folder(self._temporary, self._final)
        self.committed = True

    def abort(self) -> None:
        """Removes the temporary folder (nothing under the final name changes)."""
        if self._temporary is not None and self._temporary.exists():
            shutil.rmtree(self._temporary, ignore_errors=True)

    def __enter__(self) -> VolumeWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def _check_target(final: Path, overwrite: bool, url: str) -> None:
    """An existing output is replaced only with ``overwrite`` and only when MeLeCoLe wrote it."""
    from melecole.io.ownership import check_replaceable

    if os.path.lexists(final) and not overwrite:
        raise DataError(f"output '{url}' already exists; remove it or pass overwrite=True")
    check_replaceable(final, f"output '{url}'")


def _own_mark(layer_type: LayerType) -> dict[str, Any]:
    from melecole.io.ownership import own_attributes

    return own_attributes(layer_type)


def _create_zarr(
    parsed: VolumeURL,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: tuple[int, ...],
    resolution: Sequence[float],
    layer_type: LayerType,
    overwrite: bool,
    zarr_format: Literal[2, 3],
) -> VolumeWriter:
    import zarr

    root = Path(parsed.path)
    final = root / parsed.key if parsed.key else root
    _check_target(final, overwrite, str(final))
    temporary = _temporary_sibling(root if parsed.key is None else root.parent / f"{root.name}-{final.name}")
    if _zarr_major() >= 3:
        array = zarr.create_array(
            store=str(temporary), shape=shape, chunks=chunks, dtype=dtype, zarr_format=zarr_format, fill_value=0
        )
    elif zarr_format == 2:
        array = zarr.open_array(str(temporary), mode="w", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    else:
        raise DataError("writing the zarr v3 format needs zarr-python >= 3 (Python >= 3.11)")
    array.attrs.update(
        {
            "resolution": [float(r) for r in resolution],
            "axes": ["c", "z", "y", "x"][-len(shape) :],
            "units": "nm",
            "layer_type": layer_type,
            **_own_mark(layer_type),
        }
    )

    def finish() -> None:
        if parsed.key:
            # The array becomes a member of a (possibly new) group: create the groups on the way.
            extra = {"zarr_format": zarr_format} if _zarr_major() >= 3 else {}
            group = zarr.open_group(str(root), mode="a", **extra)
            parts = parsed.key.split("/")
            for depth in range(1, len(parts)):
                name = "/".join(parts[:depth])
                if name not in group:
                    group.create_group(name)

    def setter(index: Index, data: np.ndarray) -> None:
        array[index] = data

    return VolumeWriter(
        f"{root}:{parsed.key}" if parsed.key else str(root),
        shape,
        dtype,
        chunks,
        setter,
        temporary,
        final,
        finish,
    )


def _create_precomputed(
    parsed: VolumeURL,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: tuple[int, ...],
    resolution: Sequence[float],
    layer_type: LayerType,
    overwrite: bool,
) -> VolumeWriter:
    from cloudvolume import CloudVolume

    if layer_type == "segmentation":
        if len(shape) != 3:
            raise ValueError(f"a segmentation layer is (Z, Y, X); got shape {shape}")
        if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise ValueError(f"compressed_segmentation stores uint32 or uint64 labels, got {dtype}")
        encoding = "compressed_segmentation"
    else:
        encoding = "raw"
    channels = 1 if len(shape) == 3 else shape[0]
    spatial, spatial_chunks = shape[-3:], chunks[-3:]
    if len(shape) == 4 and chunks[0] != shape[0]:
        raise ValueError("precomputed chunks hold every channel: chunks[0] must equal the channel count")
    info = CloudVolume.create_new_info(
        num_channels=channels,
        layer_type=layer_type,
        data_type=dtype.name,
        encoding=encoding,
        resolution=[float(r) for r in resolution[::-1]],
        voxel_offset=[0, 0, 0],
        volume_size=list(spatial[::-1]),
        chunk_size=list(spatial_chunks[::-1]),
        compressed_segmentation_block_size=[8, 8, 8],
    )
    info.update(_own_mark(layer_type))
    temporary = final = None
    cloudpath = parsed.path
    if parsed.is_local:
        final = parsed.local_path
        _check_target(final, overwrite, f"precomputed://{parsed.path}")
        temporary = _temporary_sibling(final)
        cloudpath = "file://" + str(temporary)
    volume = _cloudvolume(CloudVolume, cloudpath, info=info, progress=False, cache=False, non_aligned_writes=False)
    volume.commit_info()

    def setter(index: Index, data: np.ndarray) -> None:
        if len(shape) == 4 and (index[0].start, index[0].stop) != (0, channels):
            raise ValueError("precomputed writes take every channel at once")
        z, y, x = index[-3:]
        block = data[None] if len(shape) == 3 else data
        volume[x.start : x.stop, y.start : y.stop, z.start : z.stop] = block.transpose(3, 2, 1, 0)

    return VolumeWriter(f"precomputed://{parsed.path}", shape, dtype, chunks, setter, temporary, final)


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
    """Creates an empty zarr or precomputed volume to fill block by block.

    Args:
        url: ``out.zarr``, ``out.zarr:key``, ``zarr://folder`` or ``precomputed://file:///abs/path``
            (cloud paths are written in place, not atomically). HDF5 output: use h5py with
            :func:`melecole.utils.files.atomic_path`.
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
    dtype = np.dtype(dtype)
    if parsed.format == "zarr":
        return _create_zarr(parsed, shape, dtype, chunks, resolution, layer_type, overwrite, zarr_format)
    if parsed.format == "precomputed":
        return _create_precomputed(parsed, shape, dtype, chunks, resolution, layer_type, overwrite)
    raise DataError(f"cannot create '{url}': writers exist for zarr and precomputed (write HDF5 with h5py)")


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
