"""Volume access: lazy HDF5 / zarr / precomputed volumes and writers, raw normalisation, padding crops.

This package is the bottom of MeLeCoLe's data flow: it imports nothing from the other subpackages
(chunked affinity prediction lives in :mod:`melecole.inference.chunked`), and it is the only package that
imports the storage libraries (h5py, zarr, cloudvolume). Formats: :mod:`melecole.io.formats` (a registry
with capabilities); atomic writes and their temporary names: :mod:`melecole.io.atomic`.
"""

from melecole.io.checks import (
    check_finite,
    check_same_fingerprint,
    check_writable_folder,
    output_error,
    read_fingerprint,
    remove_stale_temporaries,
)
from melecole.io.formats import FORMATS, VolumeFormat, format_modules, volume_format
from melecole.io.formats.zarr import ensure_work_array, open_work_array
from melecole.io.hdf5_output import create_hdf5
from melecole.io.raw import intensity_range, model_input, normalize_raw
from melecole.io.regions import crop_per_side, inner_region, symmetric_padding
from melecole.io.volumes import (
    HDF5_SUFFIXES,
    LazyVolume,
    VolumeURL,
    VolumeWriter,
    create_volume,
    hdf5_dataset_names,
    iter_blocks,
    open_hdf5,
    open_hdf5_volume,
    open_volume,
    parse_volume_url,
    write_volume,
)

__all__ = [
    "FORMATS",
    "HDF5_SUFFIXES",
    "LazyVolume",
    "VolumeFormat",
    "VolumeURL",
    "VolumeWriter",
    "check_finite",
    "check_same_fingerprint",
    "check_writable_folder",
    "create_hdf5",
    "create_volume",
    "crop_per_side",
    "ensure_work_array",
    "format_modules",
    "hdf5_dataset_names",
    "inner_region",
    "intensity_range",
    "iter_blocks",
    "model_input",
    "normalize_raw",
    "open_hdf5",
    "open_hdf5_volume",
    "open_volume",
    "open_work_array",
    "output_error",
    "parse_volume_url",
    "read_fingerprint",
    "remove_stale_temporaries",
    "symmetric_padding",
    "volume_format",
    "write_volume",
]
