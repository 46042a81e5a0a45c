"""Neuroglancer viewer state for raw, ground truth, segmentation, affinities and membranes.

:func:`build_viewer_state` is pure: it builds a ``neuroglancer.ViewerState`` (layers, named and
scaled (z, y, x) dimensions, padding crop) without starting a server, so tests can check it.
:func:`start_viewer` serves that state from the neuroglancer package's own web server (its client is
bundled with the package; no internet is needed). A segmentation written with meshes (``python -m
melecole.mesh``: a precomputed layer folder) is served as files by :func:`serve_folder` and shown from
there, meshes included (``segmentation_source``).

Volumes may be numpy arrays or :class:`melecole.io.LazyVolume`: lazy volumes are read chunk by
chunk while the browser asks for data, so large HDF5 / zarr / precomputed volumes are not loaded
into memory.
"""

from __future__ import annotations

import errno
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
    "check_dimensions",
    "check_server_address",
    "crop_symmetric",
    "serve_folder",
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


def crop_symmetric(array: ArrayLike, label_shape: Sequence[int], name: str) -> ArrayLike:
    """Center-crops ``array`` (..., Z', Y', X') to ``label_shape`` when it is larger by the same
    number of voxels on both sides of each axis (padding; :func:`melecole.io.symmetric_padding`), as
    the evaluation does.

    Raises:
        DataError: the spatial shape is smaller, or larger by an odd number of voxels on an axis.
    """
    spatial = tuple(int(s) for s in array.shape[-3:])
    padding = symmetric_padding(spatial, label_shape)
    if padding is None:
        raise DataError(
            f"{name} has shape {tuple(array.shape)}, expected spatial shape {tuple(label_shape)} "
            "or that plus the same padding on both sides of each axis"
        )
    return crop_per_side(array, padding) if any(padding) else array


def check_dimensions(volumes: dict[str, ArrayLike | None], channels: Sequence[str] = ("affinities",)) -> None:
    """Refuses volumes of the wrong rank: (Z, Y, X), or (C, Z, Y, X) for the roles in ``channels``.

    Raises:
        DataError: names the flag and the shape.
    """
    for role, volume in volumes.items():
        if volume is None:
            continue
        expected = 4 if role in channels else 3
        if len(volume.shape) != expected:
            layout = "(C, Z, Y, X)" if expected == 4 else "(Z, Y, X)"
            raise DataError(f"--{role}: shape {tuple(volume.shape)}, expected a {expected}D volume {layout}")


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


def _label_shape(
    raw: ArrayLike | None,
    gt: ArrayLike | None,
    segmentation: ArrayLike | None,
    affinities: ArrayLike | None,
    membranes: ArrayLike | None,
    padding: Sequence[int] | None,
) -> tuple[int, ...]:
    """The (Z, Y, X) shape of the labelled region: the smaller of GT and segmentation, else the
    membranes, else the affinities, else the raw.

    Raises:
        DataError: no volume given.
    """
    labels = [a for a in (gt, segmentation) if a is not None]
    if labels:  # a padded segmentation (or GT) is cropped to the smaller one, as in the evaluation
        return tuple(min(int(a.shape[axis]) for a in labels) for axis in range(-3, 0))
    if membranes is not None:
        return tuple(membranes.shape[-3:])
    if affinities is not None:
        return tuple(affinities.shape[-3:])
    if raw is not None:
        return tuple(int(s) - 2 * int(p) for s, p in zip(raw.shape, padding or (0, 0, 0)))
    raise DataError("nothing to show: give at least one volume")


def _raw_padding(raw: ArrayLike | None, label_shape: Sequence[int], padding: Sequence[int] | None) -> list[int]:
    """[pz, py, px] raw context per side: ``padding``, or inferred from the raw and label shapes.

    Raises:
        DataError: the padding is not 3 values >= 0, or cannot be inferred.
    """
    if padding is None:
        padding = infer_padding(raw.shape, label_shape) if raw is not None else (0, 0, 0)
    padding = [int(p) for p in padding]
    if len(padding) != 3 or min(padding) < 0:
        raise DataError(f"--padding needs 3 values >= 0 (z, y, x), got {padding}")
    return padding


def _add_image(state: Any, name: str, data: ArrayLike, dimensions: Any, *, visible: bool = True) -> None:
    """Adds the (Z, Y, X) ``data`` as image layer ``name`` (hidden at first unless ``visible``)."""
    import neuroglancer

    state.layers[name] = neuroglancer.ImageLayer(
        source=neuroglancer.LocalVolume(data=data, dimensions=dimensions, volume_type="image")
    )
    if not visible:
        state.layers[name].visible = False


def _add_affinities(
    state: Any, affinities: ArrayLike, label_shape: Sequence[int], padding: Sequence[int], resolution: list[float]
) -> None:
    """Adds the (C, Z, Y, X) affinities as a hidden RGB image layer (first three channels).

    Raises:
        DataError: the affinities are not 4D or do not fit the labels.
    """
    import neuroglancer

    channel_dimensions = neuroglancer.CoordinateSpace(
        names=["c^", "z", "y", "x"], units=["", "nm", "nm", "nm"], scales=[1.0] + resolution
    )
    if len(affinities.shape) != 4:
        raise DataError(f"affinities must be (C, Z, Y, X), got shape {tuple(affinities.shape)}")
    affinities = _as_image(crop_symmetric(affinities, label_shape, "affinities"))
    channels = [min(c, affinities.shape[0] - 1) for c in range(3)]
    state.layers["affinities"] = neuroglancer.ImageLayer(
        source=neuroglancer.LocalVolume(data=affinities, dimensions=channel_dimensions, volume_type="image"),
        shader=_AFFINITY_SHADER % tuple(channels),
    )
    state.layers["affinities"].visible = False


def build_viewer_state(
    *,
    raw: ArrayLike | None = None,
    gt: ArrayLike | None = None,
    segmentation: ArrayLike | None = None,
    affinities: ArrayLike | None = None,
    membranes: ArrayLike | None = None,
    resolution: Sequence[float] = DEFAULT_RESOLUTION,
    padding: Sequence[int] | None = None,
    segmentation_source: str | None = None,
    segments: Sequence[int] = (),
) -> Any:
    """Builds the neuroglancer state; no server is started.

    Args:
        raw: (Z, Y, X) raw, possibly padded by ``padding`` on each side (cropped to the labels).
        gt, segmentation: (Z, Y, X) integer labels (segmentation layers); the larger one is
            center-cropped to the smaller when they differ by a symmetric padding (as the
            evaluation does); affinities and membranes likewise.
        affinities: (C, Z, Y, X); the first three channels are shown as RGB (hidden at first).
        membranes: (Z, Y, X) boundary / foreground map (hidden at first).
        resolution: (z, y, x) voxel size in nm.
        padding: (pz, py, px) raw context per side; None = inferred from the raw and label shapes.
        segmentation_source: a neuroglancer source URL that serves ``segmentation`` with its meshes
            (``precomputed://http://...``, :func:`serve_folder`); the layer then reads it instead of the array,
            which must have the label shape (a served layer is not cropped).
        segments: segment ids selected at first (their meshes show in the 3D panel).

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
    check_dimensions(dict(raw=raw, gt=gt, segmentation=segmentation, affinities=affinities, membranes=membranes))
    label_shape = _label_shape(raw, gt, segmentation, affinities, membranes, padding)
    padding = _raw_padding(raw, label_shape, padding)

    dimensions = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=resolution)
    state = neuroglancer.ViewerState()
    state.dimensions = dimensions
    if raw is not None:
        _add_image(state, "raw", _as_image(crop_to_labels(raw, label_shape, padding, "raw")), dimensions)
    for name, labels in (("gt", gt), ("segmentation", segmentation)):
        if labels is not None and not (name == "segmentation" and segmentation_source is not None):
            labels = _as_segmentation(crop_symmetric(labels, label_shape, name))
            state.layers[name] = neuroglancer.SegmentationLayer(
                source=neuroglancer.LocalVolume(
                    data=labels, dimensions=dimensions, volume_type="segmentation"
                )
            )
    if segmentation is not None and segmentation_source is not None:
        _serve_segmentation(state, segmentation, segmentation_source, label_shape, segments)
    if affinities is not None:
        _add_affinities(state, affinities, label_shape, padding, resolution)
    if membranes is not None:
        membranes = _as_image(crop_symmetric(membranes, label_shape, "membranes"))
        _add_image(state, "membranes", membranes, dimensions, visible=False)
    state.position = [s / 2.0 for s in label_shape]
    state.layout = "4panel"
    return state


def _serve_segmentation(
    state: Any, segmentation: ArrayLike, source: str, label_shape: Sequence[int], segments: Sequence[int]
) -> None:
    """Points the segmentation layer at ``source`` (voxels and meshes), with ``segments`` selected.

    Raises:
        DataError: the segmentation would need a crop to fit the labels.
    """
    import neuroglancer

    if tuple(segmentation.shape[-3:]) != tuple(label_shape):
        raise DataError(
            f"segmentation with meshes has shape {tuple(segmentation.shape)}, expected the label shape "
            f"{tuple(label_shape)} (a mesh layer is shown as written, without a crop)"
        )
    state.layers["segmentation"] = neuroglancer.SegmentationLayer(source=source, segments=[int(s) for s in segments])


def check_server_address(bind_address: str, port: int) -> None:
    """Checks that the viewer can listen on ``bind_address:port`` (0 = a free port) before any work.

    Raises:
        DataError: a port outside 0..65535, an address that is not one of this machine's, or a
            port in use (neuroglancer would otherwise serve elsewhere or fail with a traceback).
    """
    import socket

    if not 0 <= int(port) <= 65535:
        raise DataError(f"--port: {port}, expected 0 (a free port) or a port in 1..65535")
    invalid = DataError(f"--bind: '{bind_address}' is not a valid address, expected e.g. 127.0.0.1 or 0.0.0.0")
    if all(part.isdigit() for part in bind_address.split(".")):  # dotted numbers: no name lookup
        try:
            socket.inet_pton(socket.AF_INET, bind_address)
        except OSError:
            raise invalid from None
    try:
        infos = socket.getaddrinfo(bind_address, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise invalid from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            flag = "--port" if error.errno == errno.EADDRINUSE else "--bind"
            raise DataError(
                f"{flag}: cannot listen on {bind_address}:{port} ({reason}), expected a free port "
                "(--port 0 picks one) on an address of this machine"
            ) from None


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


def serve_folder(folder: str | os.PathLike, bind_address: str = "127.0.0.1") -> tuple[Any, str]:
    """Serves the files of ``folder`` (e.g. a precomputed layer with meshes) over HTTP, with CORS, on a free
    port of ``bind_address``, from a background thread (neuroglancer's static file server).

    Returns:
        (the server, which serves as long as it is referenced and the process lives; its base URL).
    """
    from neuroglancer.static_file_server import StaticFileServer

    server = StaticFileServer(str(folder), bind_address=bind_address, daemon=True)
    return server, server.url
