"""Neuroglancer viewer state for raw, ground truth, segmentation, affinities and membranes.

:func:`build_viewer_state` is pure: it builds a ``neuroglancer.ViewerState`` (layers, named and
scaled (z, y, x) dimensions, padding crop) without starting a server, so tests can check it.
:func:`start_viewer` serves that state from the neuroglancer package's own web server (its client is
bundled with the package; no internet is needed).

Volumes may be numpy arrays or :class:`melecole.io.LazyVolume`: lazy volumes are read chunk by
chunk while the browser asks for data, so large HDF5 / zarr / precomputed volumes are not loaded
into memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.io import LazyVolume, crop_per_side, open_volume, parse_volume_url, symmetric_padding

__all__ = [
    "DEFAULT_KEYS",
    "DEFAULT_RESOLUTION",
    "ViewInputs",
    "open_view_inputs",
    "infer_padding",
    "crop_to_labels",
    "build_viewer_state",
    "start_viewer",
]

logger = logging.getLogger(__name__)

# HDF5 / zarr keys of each input when its URL names none (a file with a single dataset opens that one).
DEFAULT_KEYS = {
    "raw": "volume",
    "gt": "labels",
    "segmentation": "segmentation",
    "affinities": "affinities",
    "membranes": "membranes",
}
# SNEMI3D voxel size (z, y, x) in nm.
DEFAULT_RESOLUTION = (30.0, 6.0, 6.0)

ArrayLike = Any  # numpy array or LazyVolume: shape, dtype, basic slicing

_AFFINITY_SHADER = """void main() {
  emitRGB(vec3(toNormalized(getDataValue(%d)), toNormalized(getDataValue(%d)),
               toNormalized(getDataValue(%d))));
}
"""


@dataclass
class ViewInputs:
    """The volumes to show; raw may still be padded (see :func:`crop_to_labels`).

    Attributes:
        gt: (Z, Y, X) ground-truth labels.
        segmentation: (Z, Y, X) predicted labels, or None.
        raw: (Z + 2 pz, Y + 2 py, X + 2 px) or (Z, Y, X) raw, or None.
        affinities: (C, Z, Y, X), or None.
        membranes: (Z, Y, X), or None.
    """

    gt: ArrayLike
    segmentation: ArrayLike | None = None
    raw: ArrayLike | None = None
    affinities: ArrayLike | None = None
    membranes: ArrayLike | None = None


def _open(url: str | os.PathLike, role: str) -> LazyVolume:
    try:
        return open_volume(url, default_key=DEFAULT_KEYS[role])
    except DataError as error:
        raise DataError(f"--{role}: {error}") from None


def open_view_inputs(
    gt: str | os.PathLike,
    segmentation: str | os.PathLike | None = None,
    raw: str | os.PathLike | None = None,
    affinities: str | os.PathLike | None = None,
    membranes: str | os.PathLike | None = None,
) -> ViewInputs:
    """Opens the inputs lazily by URL (``file.hdf``, ``file.hdf:key``, zarr, precomputed).

    Without ``raw``, the raw is the GT file's ``volume`` dataset when it has one.

    Raises:
        DataError: a given file is missing or has no unambiguous dataset; the message names the flag.
    """
    inputs = ViewInputs(gt=_open(gt, "gt"))
    if segmentation is not None:
        inputs.segmentation = _open(segmentation, "segmentation")
    if raw is not None:
        inputs.raw = _open(raw, "raw")
    else:
        parsed = parse_volume_url(gt)
        if parsed.format == "hdf5" and parsed.key != DEFAULT_KEYS["raw"]:
            try:
                inputs.raw = open_volume(f"{parsed.path}:{DEFAULT_KEYS['raw']}")
            except DataError:
                logger.info(
                    "no --raw and no '%s' dataset in %s: showing labels only", DEFAULT_KEYS["raw"], gt
                )
    if affinities is not None:
        inputs.affinities = _open(affinities, "affinities")
    if membranes is not None:
        inputs.membranes = _open(membranes, "membranes")
    return inputs


def infer_padding(raw_shape: Sequence[int], label_shape: Sequence[int]) -> tuple[int, int, int]:
    """The symmetric padding (pz, py, px) with ``raw_shape == label_shape + 2 * padding``.

    Raises:
        DataError: the raw is smaller than the labels or larger by an odd number of voxels.
    """
    padding = symmetric_padding(raw_shape[-3:], label_shape[-3:])
    if padding is None:
        raise DataError(
            f"raw shape {tuple(raw_shape)} is not the label shape {tuple(label_shape)} plus the same "
            "padding on both sides; pass --padding Z Y X"
        )
    return padding  # type: ignore[return-value]


def crop_to_labels(
    array: ArrayLike, label_shape: Sequence[int], padding: Sequence[int], name: str
) -> ArrayLike:
    """Crops a padded volume to the labelled region; volumes of the label shape pass unchanged.

    Args:
        array: (..., Z', Y', X') with (Z', Y', X') = label shape, or label shape + 2 * padding.
        label_shape: (Z, Y, X).
        padding: (pz, py, px) context on each side; (0, 0, 0) works.
        name: used in the error message.

    Raises:
        DataError: the spatial shape is neither.
    """
    spatial = tuple(array.shape[-3:])
    label_shape = tuple(int(s) for s in label_shape)
    padded = tuple(s + 2 * int(p) for s, p in zip(label_shape, padding))
    if spatial == label_shape:
        return array
    if spatial == padded:
        return crop_per_side(array, padding)
    expected = f"{label_shape} (the labels)"
    if any(padding):
        expected += f" or {padded} (labels + 2 * padding {list(padding)})"
    hint = ""
    guess = symmetric_padding(spatial, label_shape)
    if guess is not None:
        hint = f"; for raw padded on each side pass --padding {' '.join(str(p) for p in guess)}"
    raise DataError(f"{name} has shape {tuple(array.shape)}; expected spatial shape {expected}{hint}")


def _as_segmentation(array: ArrayLike) -> ArrayLike:
    """Labels in a dtype neuroglancer segmentations accept (unsigned integers)."""
    dtype = np.dtype(array.dtype)
    if dtype.kind == "u":
        return array
    if dtype.kind in "ib":
        target = np.uint64 if dtype.itemsize > 4 else np.uint32
        return array.astype(target)
    raise DataError(f"labels must be integers, got dtype {dtype}")


def _as_image(array: ArrayLike) -> ArrayLike:
    """Intensities in a dtype neuroglancer images accept: float16 / float64 become float32, bool uint8."""
    dtype = np.dtype(array.dtype)
    if dtype.kind == "f" and dtype != np.float32:
        return array.astype(np.float32)
    if dtype.kind == "b":
        return array.astype(np.uint8)
    return array


def build_viewer_state(
    *,
    raw: ArrayLike | None = None,
    gt: ArrayLike | None = None,
    segmentation: ArrayLike | None = None,
    affinities: ArrayLike | None = None,
    membranes: ArrayLike | None = None,
    resolution: Sequence[float] = DEFAULT_RESOLUTION,
    padding: Sequence[int] | None = None,
) -> Any:
    """Builds the neuroglancer state; no server is started.

    Args:
        raw: (Z, Y, X) raw, possibly padded by ``padding`` on each side (cropped to the labels).
        gt, segmentation: (Z, Y, X) integer labels (segmentation layers).
        affinities: (C, Z, Y, X); the first three channels are shown as RGB (hidden at first).
        membranes: (Z, Y, X) boundary / foreground map (hidden at first).
        resolution: (z, y, x) voxel size in nm.
        padding: (pz, py, px) raw context per side; None = inferred from the raw and label shapes.

    Returns:
        ``neuroglancer.ViewerState`` with dimensions named z, y, x in nm and layers raw, gt,
        segmentation, affinities, membranes (those given).

    Raises:
        DataError: no volume given, or shapes that do not fit together.
    """
    import neuroglancer

    resolution = [float(r) for r in resolution]
    if len(resolution) != 3 or min(resolution) <= 0:
        raise DataError(f"--resolution needs 3 positive values (z, y, x) in nm, got {resolution}")
    labelled = [a for a in (gt, segmentation, membranes) if a is not None]
    if labelled:
        label_shape = tuple(labelled[0].shape)
    elif affinities is not None:
        label_shape = tuple(affinities.shape[-3:])
    elif raw is not None:
        label_shape = tuple(int(s) - 2 * int(p) for s, p in zip(raw.shape, padding or (0, 0, 0)))
    else:
        raise DataError("nothing to show: give at least one volume")
    if padding is None:
        padding = infer_padding(raw.shape, label_shape) if raw is not None else (0, 0, 0)
    padding = [int(p) for p in padding]
    if len(padding) != 3 or min(padding) < 0:
        raise DataError(f"--padding needs 3 values >= 0 (z, y, x), got {padding}")

    dimensions = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=resolution)
    channel_dimensions = neuroglancer.CoordinateSpace(
        names=["c^", "z", "y", "x"], units=["", "nm", "nm", "nm"], scales=[1.0] + resolution
    )
    state = neuroglancer.ViewerState()
    state.dimensions = dimensions
    if raw is not None:
        raw = _as_image(crop_to_labels(raw, label_shape, padding, "raw"))
        state.layers["raw"] = neuroglancer.ImageLayer(
            source=neuroglancer.LocalVolume(data=raw, dimensions=dimensions, volume_type="image")
        )
    for name, labels in (("gt", gt), ("segmentation", segmentation)):
        if labels is not None:
            labels = _as_segmentation(crop_to_labels(labels, label_shape, (0, 0, 0), name))
            state.layers[name] = neuroglancer.SegmentationLayer(
                source=neuroglancer.LocalVolume(
                    data=labels, dimensions=dimensions, volume_type="segmentation"
                )
            )
    if affinities is not None:
        if len(affinities.shape) != 4:
            raise DataError(f"affinities must be (C, Z, Y, X), got shape {tuple(affinities.shape)}")
        affinities = _as_image(crop_to_labels(affinities, label_shape, padding, "affinities"))
        channels = [min(c, affinities.shape[0] - 1) for c in range(3)]
        state.layers["affinities"] = neuroglancer.ImageLayer(
            source=neuroglancer.LocalVolume(
                data=affinities, dimensions=channel_dimensions, volume_type="image"
            ),
            shader=_AFFINITY_SHADER % tuple(channels),
        )
        state.layers["affinities"].visible = False
    if membranes is not None:
        membranes = _as_image(crop_to_labels(membranes, label_shape, padding, "membranes"))
        state.layers["membranes"] = neuroglancer.ImageLayer(
            source=neuroglancer.LocalVolume(data=membranes, dimensions=dimensions, volume_type="image")
        )
        state.layers["membranes"].visible = False
    state.position = [s / 2.0 for s in label_shape]
    state.layout = "4panel"
    return state


def start_viewer(state: Any, bind_address: str = "127.0.0.1", port: int = 0) -> Any:
    """Serves ``state`` on ``bind_address:port`` (0 = a free port); returns the ``neuroglancer.Viewer``.

    The server runs in a background thread for as long as the Python process lives (e.g. under
    ``python -i``); ``viewer.get_viewer_url()`` is the address to open.
    """
    import neuroglancer

    neuroglancer.set_server_bind_address(bind_address, int(port))
    viewer = neuroglancer.Viewer()
    viewer.set_state(state)
    return viewer
