"""Large-volume I/O: lazy HDF5 / zarr / precomputed volumes, writers, chunked affinity prediction."""

from melecole.io.chunked import ChunkedPrediction, predict_affinities_chunked
from melecole.io.volumes import (
    LazyVolume,
    VolumeURL,
    VolumeWriter,
    create_volume,
    iter_blocks,
    open_volume,
    parse_volume_url,
    write_volume,
)

__all__ = [
    "ChunkedPrediction",
    "LazyVolume",
    "VolumeURL",
    "VolumeWriter",
    "create_volume",
    "iter_blocks",
    "open_volume",
    "parse_volume_url",
    "predict_affinities_chunked",
    "write_volume",
]
