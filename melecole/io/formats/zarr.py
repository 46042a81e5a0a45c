"""zarr volumes (zarr-python 2 or 3; arrays v2 or v3): ``out.zarr``, ``out.zarr:key``, ``out.zarr/key``,
``zarr://folder``.

Every output is an OME-Zarr image group (:mod:`melecole.io.ngff`: NGFF 0.4 for zarr v2, 0.5 for v3) whose
full-resolution array is its member ``0``; segmentations are NGFF label images. The URL names the group
(``out.zarr:segmentation``), and reading one resolves it to its level-0 array, as it does for any NGFF
input (voxel size from its ``multiscales`` scale, converted to nm); plain arrays read as before.

Outputs are written to a temporary folder beside the root (``.<name>.<8 hex>.tmp``) and renamed into
place on commit; a volume inside a group (``out.zarr:key``) becomes a member of the group, created on
the way. Every output carries MeLeCoLe's mark in its group's attributes
(:func:`melecole.io.ownership.own_attributes`).

Work arrays (:func:`ensure_work_array`, :func:`open_work_array`) are the zarr v2 arrays of a blockwise work
folder, written in place block by block (zarr writes each chunk to a temporary and renames it); the
segmentation's work array is created as an NGFF label image already, so that its commit is one rename.
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
from melecole.io.ngff import LEVEL_PATH, Level, NgffImage, image_attributes, read_image
from melecole.utils.files import temporary_name

__all__ = ["FORMAT", "create_groups", "ensure_work_array", "open_work_array", "zarr_major"]


def zarr_major() -> int:
    """The major version of the installed zarr-python (2 or 3)."""
    import zarr

    return int(zarr.__version__.split(".")[0])


def _is_image(group: Any) -> bool:
    """True when a group's attributes hold NGFF ``multiscales`` (0.4, or 0.5 under ``ome``); not validated."""
    attributes = group.attrs
    ome = attributes.get("ome")
    return "multiscales" in attributes or (isinstance(ome, dict) and "multiscales" in ome)


def _zarr_volumes(group: Any, prefix: str = "") -> list[str]:
    """Paths of every volume below ``group``: its arrays, and NGFF image groups as one volume each (their
    level arrays are not listed; their label images are). zarr-python 2 and 3 both have arrays() and groups()."""
    names = [] if _is_image(group) else [f"{prefix}{name}" for name, _ in group.arrays()]
    for name, member in group.groups():
        if _is_image(member):
            names.append(f"{prefix}{name}")
        names.extend(_zarr_volumes(member, f"{prefix}{name}/"))
    return names


def _level_array(group: Any, image: NgffImage, where: str) -> Any:
    """The level-0 array of an NGFF image group; DataError when the metadata names none that fits."""
    import zarr

    field = ("ome." if image.version == "0.5" else "") + "multiscales[0]"
    path = image.paths[0]
    try:
        array = group[path]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise DataError(
            f"{where}: OME-Zarr field {field}.datasets[0].path is '{path}', which names no array of the group, "
            "expected the path of its level-0 array"
        )
    if array.ndim != len(image.axes):
        raise DataError(
            f"{where}: OME-Zarr field {field}.axes has {len(image.axes)} axes ({', '.join(image.axes)}) but the "
            f"level-0 array '{path}' has {array.ndim} dimensions, expected one axis per dimension"
        )
    return array


def _listing(node: Any) -> str:
    return ", ".join(sorted(_zarr_volumes(node))) or "none"


def _parent_scale(node: Any, key: str, where: str) -> tuple[float, float, float] | None:
    """The voxel size of array ``key`` when its parent group is an NGFF image that lists it as a level."""
    parent_key, _, name = key.rpartition("/")
    parent = node[parent_key] if parent_key else node
    image = read_image(dict(parent.attrs), where)
    if image is None or name not in image.paths:
        return None
    return image.resolutions[image.paths.index(name)]


def _resolve(root: Path, node: Any, key: str | None, default_key: str | None) -> tuple[Any, str | None, Any]:
    """The array a URL names: ``key`` (a group member), ``default_key`` or the only volume of the group;
    an NGFF image group stands for its level-0 array. Returns (array, key, resolution or None)."""
    import zarr

    if key is None and not _is_image(node):
        volumes = _zarr_volumes(node)
        if default_key is not None and default_key in volumes:
            key = default_key
        elif len(volumes) == 1:
            key = volumes[0]
        else:
            raise DataError(
                f"zarr '{root}' holds {len(volumes)} arrays ({', '.join(sorted(volumes)) or 'none'}); "
                f"name one as {root}:KEY"
            )
    where = f"{root}:{key}" if key else str(root)
    try:
        member = node[key] if key else node
    except KeyError:
        raise DataError(f"zarr '{root}': array '{key}' not found; it holds: {_listing(node)}") from None
    if isinstance(member, zarr.Array):
        scale = _parent_scale(node, key, where) if key else None
        return member, key, scale or resolution_attribute(member.attrs)
    image = read_image(dict(member.attrs), where)
    if image is None:
        raise DataError(
            f"zarr '{root}': '{key}' is a group, not an array or OME-Zarr image; it holds: {_listing(member)}"
        )
    array = _level_array(member, image, where)
    resolution = image.resolutions[0] or resolution_attribute(array.attrs) or resolution_attribute(member.attrs)
    return array, key, resolution


def open_zarr(path: str, key: str | None, default_key: str | None = None) -> LazyVolume:
    """Opens a zarr array, an OME-Zarr image (its level-0 array), or a volume of a group (``key``,
    ``default_key`` or the only one) lazily.

    Raises:
        DataError: missing or unreadable store, missing key, no unambiguous volume, or OME-Zarr metadata
            that is not valid NGFF 0.4 / 0.5 or not (c,) z, y, x in a length unit.
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
        array, key, resolution = _resolve(root, node, key, default_key)
    elif key is not None:
        raise DataError(f"zarr '{root}' is an array, not a group; it has no member '{key}'")
    else:
        array, resolution = node, resolution_attribute(node.attrs)
    url = f"{root}:{key}" if key else str(root)
    return LazyVolume(
        lambda slices: array[slices],
        array.shape,
        array.dtype,
        chunks=array.chunks,
        url=url,
        resolution=resolution,
    )


def _volume_attributes(ndim: int, resolution: Sequence[float], layer_type: str) -> dict[str, Any]:
    """MeLeCoLe's own volume attributes (kept beside the NGFF metadata for readers of earlier versions)."""
    axes = ["c", "z", "y", "x"][-ndim:]
    return {"resolution": [float(r) for r in resolution], "axes": axes, "units": "nm", "layer_type": layer_type}


def _new_image(location: Path, spec: VolumeSpec, name: str) -> Any:
    """A new OME-Zarr image group at ``location`` (attributes: NGFF metadata, the volume attributes and
    MeLeCoLe's mark) holding a zero-filled level-0 array, which is returned."""
    import zarr

    volume = _volume_attributes(len(spec.shape), spec.resolution, spec.layer_type)
    ngff = image_attributes(
        len(spec.shape) == 4,
        [Level(LEVEL_PATH, tuple(float(r) for r in spec.resolution))],  # type: ignore[arg-type]
        zarr_format=spec.zarr_format,
        label=spec.layer_type == "segmentation",
        name=name,
    )
    layout: dict[str, Any] = dict(shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=0)
    if zarr_major() >= 3:
        if spec.zarr_format == 3:  # NGFF 0.5: the array's dimension names are the axes' names
            layout["dimension_names"] = volume["axes"]
        group = zarr.open_group(str(location), mode="w", zarr_format=spec.zarr_format)
        group.attrs.update({**ngff, **volume, **own_mark(spec.layer_type)})
        return group.create_array(LEVEL_PATH, attributes=volume, **layout)
    if spec.zarr_format != 2:
        raise DataError("writing the zarr v3 format needs zarr-python >= 3 (Python >= 3.11)")
    group = zarr.open_group(str(location), mode="w")
    group.attrs.update({**ngff, **volume, **own_mark(spec.layer_type)})
    array = group.zeros(LEVEL_PATH, **layout)
    array.attrs.update(volume)
    return array


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
    """A writer of a new zarr volume, an OME-Zarr image group whose level-0 array it fills (``key``: a member
    of the group ``path``), renamed into place on commit.

    Raises:
        DataError: the output exists (without ``spec.overwrite``) or was not written by MeLeCoLe.
    """
    root = Path(path)
    final = root / key if key else root
    check_target(final, spec.overwrite, str(final))
    temporary = temporary_name(root if key is None else root.parent / f"{root.name}-{final.name}")
    array = _new_image(temporary, spec, key or root.name.removesuffix(".zarr"))

    def finish() -> None:
        if key:  # the image becomes a member of a (possibly new) group
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
    ``attrs``); an array that exists already (a resumed run) is kept. OSError on a failed write.

    A segmentation (``layer_type="segmentation"``: the blockwise output) is created as an NGFF 0.4 label
    image, a group holding the array as its level ``0``, so that committing it is one rename;
    :func:`open_work_array` opens that array.
    """
    import zarr

    path = Path(path)
    if (path / ".zarray").is_file() or (path / LEVEL_PATH / ".zarray").is_file():
        return
    volume = {"resolution": [float(r) for r in resolution], "axes": ["z", "y", "x"], "units": "nm", **attrs}
    layout = dict(shape=tuple(shape), chunks=list(chunks), dtype=dtype, zarr_format=2, fill_value=0)
    if attrs.get("layer_type") != "segmentation":
        zarr.create_array(store=str(path), attributes=volume, **layout)
        return
    ngff = image_attributes(
        False, [Level(LEVEL_PATH, tuple(float(r) for r in resolution))],  # type: ignore[arg-type]
        zarr_format=2, label=True, name=path.name.removesuffix(".zarr"),
    )
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs.update({**ngff, **volume})  # before the array: the array's presence means a complete group
    group.create_array(LEVEL_PATH, attributes=volume, **{k: v for k, v in layout.items() if k != "zarr_format"})


def open_work_array(path: str | os.PathLike) -> Any:
    """A work array opened for reading and writing in place (``array[box]`` reads, ``array[box] = v`` writes);
    for an NGFF image group (the segmentation), its level-0 array."""
    import zarr

    level = Path(path) / LEVEL_PATH
    return zarr.open_array(str(level if (level / ".zarray").is_file() else path), mode="r+")


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
