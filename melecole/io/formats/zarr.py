"""zarr volumes (zarr-python 2 or 3; arrays v2 or v3): ``out.zarr``, ``out.zarr:key``, ``out.zarr/key``,
``zarr://folder``.

Outputs are written to a temporary folder beside the root (``.<name>.<8 hex>.tmp``) and renamed into
place on commit; an array inside a group (``out.zarr:key``) becomes a member of the group, created on
the way. Every output carries MeLeCoLe's mark in its attributes (:func:`melecole.io.ownership.own_attributes`).

Work arrays (:func:`ensure_work_array`, :func:`open_work_array`) are the zarr v2 arrays of a blockwise work
folder, written in place block by block (zarr writes each chunk to a temporary and renames it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.io.formats.base import (
    Index,
    LazyVolume,
    VolumeFormat,
    VolumeSpec,
    VolumeWriter,
    check_target,
    own_mark,
    resolution_attribute,
)
from melecole.utils.files import temporary_name

__all__ = ["FORMAT", "create_groups", "ensure_work_array", "open_work_array", "zarr_major"]


def zarr_major() -> int:
    """The major version of the installed zarr-python (2 or 3)."""
    import zarr

    return int(zarr.__version__.split(".")[0])


def _zarr_arrays(group: Any, prefix: str = "") -> list[str]:
    """Paths of every array below ``group`` (zarr-python 2 and 3 both have arrays() and groups())."""
    names = [f"{prefix}{name}" for name, _ in group.arrays()]
    for name, member in group.groups():
        names.extend(_zarr_arrays(member, f"{prefix}{name}/"))
    return names


def _member(root: Path, node: Any, key: str | None, default_key: str | None) -> tuple[Any, str | None]:
    """The array of a group named by ``key`` (or ``default_key`` / the only array); (array, key)."""
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
        raise DataError(f"zarr '{root}': array '{key}' not found; it holds: {', '.join(sorted(arrays)) or 'none'}")
    return node[key], key


def open_zarr(path: str, key: str | None, default_key: str | None = None) -> LazyVolume:
    """Opens a zarr array (or an array of a group: ``key``, ``default_key`` or the only one) lazily.

    Raises:
        DataError: missing or unreadable store, missing key, or no unambiguous array.
    """
    import zarr

    root = Path(path)
    if not root.exists():
        raise DataError(f"zarr '{root}' does not exist")
    try:
        node = zarr.open(store=str(root), mode="r")
    except Exception as error:  # zarr raises several types for a folder that is not zarr
        raise DataError(f"'{root}' is not a readable zarr array or group ({error})") from None
    if isinstance(node, zarr.Group):
        array, key = _member(root, node, key, default_key)
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
        resolution=resolution_attribute(array.attrs),
    )


def _new_array(location: Path, spec: VolumeSpec) -> Any:
    """A zero-filled zarr array at ``location`` (v2 or v3 as ``spec.zarr_format`` says)."""
    import zarr

    if zarr_major() >= 3:
        return zarr.create_array(
            store=str(location),
            shape=spec.shape,
            chunks=spec.chunks,
            dtype=spec.dtype,
            zarr_format=spec.zarr_format,
            fill_value=0,
        )
    if spec.zarr_format == 2:
        return zarr.open_array(
            str(location), mode="w", shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=0
        )
    raise DataError("writing the zarr v3 format needs zarr-python >= 3 (Python >= 3.11)")


def create_groups(root: Path, key: str, zarr_format: int = 2) -> None:
    """Creates the (possibly new) group ``root`` and the groups on the way to its member ``key``."""
    import zarr

    extra = {"zarr_format": zarr_format} if zarr_major() >= 3 else {}
    group = zarr.open_group(str(root), mode="a", **extra)
    parts = key.split("/")
    for depth in range(1, len(parts)):
        name = "/".join(parts[:depth])
        if name not in group:
            group.create_group(name)


def create_zarr(path: str, key: str | None, spec: VolumeSpec) -> VolumeWriter:
    """A writer of a new zarr array (``key``: a member of the group ``path``), renamed into place on commit.

    Raises:
        DataError: the output exists (without ``spec.overwrite``) or was not written by MeLeCoLe.
    """
    root = Path(path)
    final = root / key if key else root
    check_target(final, spec.overwrite, str(final))
    temporary = temporary_name(root if key is None else root.parent / f"{root.name}-{final.name}")
    array = _new_array(temporary, spec)
    array.attrs.update(
        {
            "resolution": [float(r) for r in spec.resolution],
            "axes": ["c", "z", "y", "x"][-len(spec.shape) :],
            "units": "nm",
            "layer_type": spec.layer_type,
            **own_mark(spec.layer_type),
        }
    )

    def finish() -> None:
        if key:  # the array becomes a member of a (possibly new) group
            create_groups(root, key, spec.zarr_format)

    def setter(index: Index, data: np.ndarray) -> None:
        array[index] = data

    url = f"{root}:{key}" if key else str(root)
    return VolumeWriter(url, spec.shape, spec.dtype, spec.chunks, setter, temporary, final, finish)


def ensure_work_array(
    path: str | os.PathLike,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    resolution: Sequence[float],
    **attrs: Any,
) -> None:
    """Creates a zero-filled zarr (v2) work array with the volume attributes (resolution, axes z y x, nm and
    ``attrs``); an array that exists already (a resumed run) is kept. OSError on a failed write."""
    import zarr

    if (Path(path) / ".zarray").is_file():
        return
    array = zarr.create_array(
        store=str(path), shape=tuple(shape), chunks=list(chunks), dtype=dtype, zarr_format=2, fill_value=0
    )
    array.attrs.update({"resolution": list(resolution), "axes": ["z", "y", "x"], "units": "nm", **attrs})


def open_work_array(path: str | os.PathLike) -> Any:
    """A work array opened for reading and writing in place (``array[box]`` reads, ``array[box] = v`` writes)."""
    import zarr

    return zarr.open_array(str(path), mode="r+")


def _open(path: str, key: str | None, default_key: str | None) -> LazyVolume:
    return open_zarr(path, key, default_key)


FORMAT = VolumeFormat(
    name="zarr",
    summary="zarr array or group member (x.zarr, x.zarr:key, x.zarr/key, zarr://folder), v2 or v3",
    open=_open,
    create=create_zarr,
    has_keys=True,
    keys_are_folders=True,
    modules=("zarr",),
)
