"""OME-Zarr (NGFF) metadata: what every zarr volume MeLeCoLe writes carries, and what it reads from inputs.

A volume is an NGFF *image group*: the group holds the ``multiscales`` metadata (axes ``c, z, y, x`` or
``z, y, x``, unit nanometer, the voxel size as each level's ``scale``) and its level arrays ``0`` (full
resolution), ``1`` ... (downsampled, optional). Segmentations are NGFF *label images* (``image-label``
metadata as well), which napari-ome-zarr opens as a labels layer. zarr v2 groups get NGFF 0.4 (the
metadata in ``.zattrs``), zarr v3 groups NGFF 0.5 (under ``ome`` in ``zarr.json``).

The metadata model is ome-zarr-models' (pydantic models of NGFF 0.4 and 0.5, imported on first use):
what is written is built and validated by it, and an input's metadata is validated by it before
MeLeCoLe reads its axes, units and scales (one-line :class:`~melecole.errors.DataError` otherwise).
MeLeCoLe's own checks come on top: (c,) z, y, x axes and a length unit it can convert to nanometers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from melecole.errors import DataError

__all__ = [
    "LEVEL_PATH",
    "NANOMETERS_PER_UNIT",
    "NgffImage",
    "Level",
    "image_attributes",
    "ngff_version",
    "read_image",
]

LEVEL_PATH = "0"  # the full-resolution array of every image MeLeCoLe writes
# Length units of the NGFF axis unit list (UDUNITS-2 names) -> nanometers.
NANOMETERS_PER_UNIT: dict[str, float] = {
    "yoctometer": 1e-15, "zeptometer": 1e-12, "attometer": 1e-9, "femtometer": 1e-6, "picometer": 1e-3,
    "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "centimeter": 1e7,
    "decimeter": 1e8, "meter": 1e9, "hectometer": 1e11, "kilometer": 1e12, "megameter": 1e15,
    "gigameter": 1e18, "terameter": 1e21, "petameter": 1e24, "exameter": 1e27, "zettameter": 1e30,
    "yottameter": 1e33, "inch": 2.54e7, "foot": 3.048e8, "yard": 9.144e8, "mile": 1.609344e12,
    "parsec": 3.0856775814913673e25,
}
_VERSIONS = {2: "0.4", 3: "0.5"}


@dataclass(frozen=True)
class Level:
    """One resolution level of an image: its array path, (z, y, x) voxel size and origin offset in nm."""

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class NgffImage:
    """What MeLeCoLe reads from an NGFF image group's metadata (its first multiscale).

    Attributes:
        version: "0.4" or "0.5".
        axes: axis names, e.g. ("c", "z", "y", "x").
        paths: the level arrays, finest first (``paths[0]`` is the volume).
        resolutions: per level, the (z, y, x) voxel size in nm; None where the axes carry no unit.
        label: True for a label image (``image-label`` metadata).
    """

    version: str
    axes: tuple[str, ...]
    paths: tuple[str, ...]
    resolutions: tuple[tuple[float, float, float] | None, ...]
    label: bool


def ngff_version(zarr_format: int) -> str:
    """The NGFF version MeLeCoLe writes into a zarr v2 (0.4) or v3 (0.5) group."""
    return _VERSIONS[int(zarr_format)]


def _models(version: str) -> Any:
    """ome-zarr-models' modules of NGFF ``version`` (a namespace: axes, multiscales, image, image_label)."""
    try:
        if version == "0.4":
            from ome_zarr_models.v04 import axes, image, image_label, image_label_types, multiscales
        else:
            from ome_zarr_models.v05 import axes, image, image_label, image_label_types, multiscales
    except ImportError as error:
        raise ModuleNotFoundError(
            f"OME-Zarr metadata needs ome-zarr-models ({error}); pip install 'ome-zarr-models>=1.7'"
        ) from error
    return type("Models", (), dict(axes=axes, image=image, image_label=image_label,
                                    label_types=image_label_types, multiscales=multiscales))


def image_attributes(
    channels: bool, levels: Sequence[Level], *, zarr_format: int, label: bool, name: str | None = None,
    downsampling: str | None = None,
) -> dict[str, Any]:
    """The group attributes of an NGFF image (a label image when ``label``), built and validated by
    ome-zarr-models.

    Args:
        channels: a leading channel axis (c, z, y, x) instead of (z, y, x).
        levels: the level arrays, finest first.
        zarr_format: 2 (NGFF 0.4: the attributes are the group's ``.zattrs``) or 3 (NGFF 0.5: under ``ome``).
        label: add ``image-label`` metadata (segmentations).
        name: the multiscale's name.
        downsampling: how levels beyond the first were made (multiscale ``type``, e.g. "mode").

    Returns:
        A JSON-ready dict to merge into the group's attributes.
    """
    version = ngff_version(zarr_format)
    models = _models("0.4")
    space = [models.axes.Axis(name=axis, type="space", unit="nanometer") for axis in "zyx"]
    axes = ([models.axes.Axis(name="c", type="channel")] if channels else []) + space
    scale_lead, shift_lead = ([1.0], [0.0]) if channels else ([], [])
    datasets = tuple(
        models.multiscales.Dataset.build(
            path=level.path,
            scale=scale_lead + [float(s) for s in level.scale],
            translation=None if level.translation is None else shift_lead + [float(t) for t in level.translation],
        )
        for level in levels
    )
    multiscale = models.multiscales.Multiscale(
        axes=axes, datasets=datasets, name=name, type=downsampling, version="0.4" if version == "0.4" else None
    )
    if version == "0.5":
        models = _models("0.5")
        multiscale = multiscale.to_version("0.5")
    fields: dict[str, Any] = {"multiscales": [multiscale]}
    if version == "0.5":
        fields["version"] = "0.5"
    if label:
        fields["image-label"] = models.label_types.Label(version=version)
    attrs_class = models.image_label.ImageLabelAttrs if label else models.image.ImageAttrs
    dumped = attrs_class.model_validate(fields).model_dump(by_alias=True, exclude_none=True, mode="json")
    return {"ome": dumped} if version == "0.5" else dumped


def _ome_fields(attributes: Mapping[str, Any], where: str) -> tuple[str, Mapping[str, Any]] | None:
    """(NGFF version, the dict holding ``multiscales``) of a group's attributes; None: not an NGFF image."""
    ome = attributes.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        if ome.get("version") != "0.5":
            raise DataError(f"{where}: OME-Zarr field ome.version is {ome.get('version')!r}, expected '0.5'")
        return "0.5", ome
    multiscales = attributes.get("multiscales")
    if multiscales is None:
        return None
    first = multiscales[0] if isinstance(multiscales, list) and multiscales else {}
    version = first.get("version") if isinstance(first, Mapping) else None
    if version not in (None, "0.4"):
        raise DataError(
            f"{where}: OME-Zarr field multiscales[0].version is {version!r}, expected '0.4' (zarr v2) or 0.5 "
            "(zarr v3); convert older OME-Zarr with ome-zarr-py or bioformats2raw"
        )
    return "0.4", attributes


def _validated(version: str, fields: Mapping[str, Any], where: str) -> Any:
    """ome-zarr-models' image attributes of ``fields``; a one-line DataError naming the first bad field."""
    from pydantic import ValidationError

    models = _models(version)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # advice on optional fields is not an input error
            return models.image.ImageAttrs.model_validate(dict(fields))
    except ValidationError as error:
        first = error.errors()[0]
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        prefix = "ome." if version == "0.5" else ""
        message = first["msg"].removeprefix("Value error, ")
        raise DataError(
            f"{where}: OME-Zarr {version} field {prefix}{field or 'multiscales'}: {message}, expected valid NGFF "
            f"{version} image metadata"
        ) from None


def _check_axes(axes: Sequence[Any], where: str, field: str) -> tuple[str, ...]:
    """Axis names; DataError unless they are (c,) z, y, x with space z, y, x."""
    names = tuple(str(axis.name) for axis in axes)
    lead = axes[:-3]
    channel_lead = len(lead) <= 1 and all(axis.type == "channel" or str(axis.name) == "c" for axis in lead)
    space = tuple(name.lower() for name in names[-3:]) == ("z", "y", "x") and all(
        axis.type in (None, "space") for axis in axes[-3:]
    )
    if len(names) < 3 or not channel_lead or not space:
        raise DataError(
            f"{where}: OME-Zarr field {field}.axes is {list(names)}, expected z, y, x (space) or c, z, y, x "
            "(channel first)"
        )
    return names


def _unit_factors(axes: Sequence[Any], where: str, field: str) -> tuple[float, float, float] | None:
    """Nanometers per unit of the z, y, x axes; None when an axis has no unit (the scale is in voxels)."""
    factors = []
    for index, axis in enumerate(axes[-3:], start=len(axes) - 3):
        if axis.unit is None:
            return None
        unit = str(axis.unit).lower()
        if unit not in NANOMETERS_PER_UNIT:
            raise DataError(
                f"{where}: OME-Zarr field {field}.axes[{index}].unit is {axis.unit!r}, expected a length unit "
                "(nanometer, micrometer, angstrom, ...)"
            )
        factors.append(NANOMETERS_PER_UNIT[unit])
    return factors[0], factors[1], factors[2]


def _scale(transforms: Sequence[Any] | None) -> list[float] | None:
    """The scale vector of a coordinateTransformations list (None: none, or one stored in a file)."""
    for transform in transforms or ():
        if getattr(transform, "type", None) == "scale":
            scale = getattr(transform, "scale", None)
            return [float(s) for s in scale] if scale is not None else None
    return None


def read_image(attributes: Mapping[str, Any], where: str) -> NgffImage | None:
    """The NGFF image metadata of a zarr group's ``attributes``; None when it holds none.

    Args:
        attributes: the group's attributes (``.zattrs``; ``zarr.json``'s ``attributes``).
        where: names the group in messages (``file.zarr:key``).

    Raises:
        DataError: one line naming the field: metadata that is not valid NGFF 0.4 / 0.5, axes other than
            (c,) z, y, x, or a unit that is not a length.
    """
    found = _ome_fields(attributes, where)
    if found is None:
        return None
    version, fields = found
    multiscale = _validated(version, fields, where).multiscales[0]
    field = ("ome." if version == "0.5" else "") + "multiscales[0]"
    names = _check_axes(multiscale.axes, where, field)
    factors = _unit_factors(multiscale.axes, where, field)
    overall = _scale(multiscale.coordinateTransformations) or [1.0] * len(names)
    resolutions: list[tuple[float, float, float] | None] = []
    for dataset in multiscale.datasets:
        scale = _scale(dataset.coordinateTransformations)
        if factors is None or scale is None:
            resolutions.append(None)
            continue
        voxel = [s * o * f for s, o, f in zip(scale[-3:], overall[-3:], factors)]
        resolutions.append((voxel[0], voxel[1], voxel[2]))
    return NgffImage(
        version,
        names,
        tuple(str(dataset.path) for dataset in multiscale.datasets),
        tuple(resolutions),
        "image-label" in fields,
    )
