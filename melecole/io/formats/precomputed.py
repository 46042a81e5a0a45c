"""Neuroglancer precomputed volumes via CloudVolume: ``precomputed://file:///abs/path``, ``gs://``, ``s3://``, ...

CloudVolume's (x, y, z, c) order is converted to MeLeCoLe's (Z, Y, X) / (C, Z, Y, X). Local layers
(``file://``) are written to a temporary folder beside the target and renamed into place on commit;
remote layers are written in place (object stores have no rename). Segmentations are stored with
compressed_segmentation. Missing cloud credentials are a one-line DataError.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable

import numpy as np

from melecole.errors import DataError
from melecole.io.formats.base import Index, LazyVolume, VolumeFormat, VolumeSpec, VolumeWriter, check_target, own_mark
from melecole.utils.files import temporary_name

__all__ = ["FORMAT", "create_precomputed", "open_precomputed"]

LOCAL_PREFIX = "file://"


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


def open_precomputed(path: str, key: str | None = None, default_key: str | None = None) -> LazyVolume:
    """Opens a precomputed layer (CloudVolume path ``file:///abs``, ``gs://...``) lazily; ``key`` and
    ``default_key`` are unused (a layer holds one volume).

    Raises:
        DataError: a missing layer or ``info`` file, or missing credentials.
    """
    from cloudvolume import CloudVolume
    from cloudvolume.exceptions import InfoUnavailableError

    if FORMAT.is_local(path) and not (FORMAT.local_path(path) / "info").is_file():
        raise DataError(f"precomputed layer '{path}' does not exist (no 'info' file)")
    try:
        volume = _cloudvolume(CloudVolume, path, progress=False, fill_missing=False, cache=False)
    except InfoUnavailableError:
        raise DataError(f"precomputed layer '{path}' has no readable 'info' file") from None
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
    return LazyVolume(reader, shape, volume.dtype, chunks=chunks, url=f"precomputed://{path}", resolution=resolution)


def _info(spec: VolumeSpec) -> dict[str, Any]:
    """The ``info`` of a new layer (with MeLeCoLe's mark).

    Raises:
        ValueError: a segmentation that is not (Z, Y, X) uint32 / uint64, or chunks that split the channels.
    """
    from cloudvolume import CloudVolume

    shape, chunks, dtype = spec.shape, spec.chunks, spec.dtype
    if spec.layer_type == "segmentation":
        if len(shape) != 3:
            raise ValueError(f"a segmentation layer is (Z, Y, X); got shape {shape}")
        if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise ValueError(f"compressed_segmentation stores uint32 or uint64 labels, got {dtype}")
    if len(shape) == 4 and chunks[0] != shape[0]:
        raise ValueError("precomputed chunks hold every channel: chunks[0] must equal the channel count")
    info = CloudVolume.create_new_info(
        num_channels=1 if len(shape) == 3 else shape[0],
        layer_type=spec.layer_type,
        data_type=dtype.name,
        encoding="compressed_segmentation" if spec.layer_type == "segmentation" else "raw",
        resolution=[float(r) for r in spec.resolution[::-1]],
        voxel_offset=[0, 0, 0],
        volume_size=list(shape[-3:][::-1]),
        chunk_size=list(chunks[-3:][::-1]),
        compressed_segmentation_block_size=[8, 8, 8],
    )
    info.update(own_mark(spec.layer_type))
    return info


def create_precomputed(path: str, key: str | None, spec: VolumeSpec) -> VolumeWriter:
    """A writer of a new precomputed layer; a local one is renamed into place on commit (``key`` unused).

    Raises:
        DataError: the output exists (without ``spec.overwrite``) or was not written by MeLeCoLe.
        ValueError: see :func:`_info`.
    """
    from cloudvolume import CloudVolume

    info = _info(spec)
    temporary = final = None
    cloudpath = path
    if FORMAT.is_renamable(path):
        final = FORMAT.local_path(path)
        check_target(final, spec.overwrite, f"precomputed://{path}")
        temporary = temporary_name(final)
        cloudpath = LOCAL_PREFIX + str(temporary)
    volume = _cloudvolume(CloudVolume, cloudpath, info=info, progress=False, cache=False, non_aligned_writes=False)
    volume.commit_info()
    channels = 1 if len(spec.shape) == 3 else spec.shape[0]

    def setter(index: Index, data: np.ndarray) -> None:
        if len(spec.shape) == 4 and (index[0].start, index[0].stop) != (0, channels):
            raise ValueError("precomputed writes take every channel at once")
        z, y, x = index[-3:]
        block = data[None] if len(spec.shape) == 3 else data
        volume[x.start : x.stop, y.start : y.stop, z.start : z.stop] = block.transpose(3, 2, 1, 0)

    return VolumeWriter(f"precomputed://{path}", spec.shape, spec.dtype, spec.chunks, setter, temporary, final)


FORMAT = VolumeFormat(
    name="precomputed",
    summary="Neuroglancer precomputed layer via CloudVolume (precomputed://file:///abs/path, gs://, s3://, https://)",
    open=open_precomputed,
    create=create_precomputed,
    local_prefix=LOCAL_PREFIX,
    modules=("cloudvolume",),
)
