"""The volume formats registry: :data:`FORMATS` maps a format name to its :class:`VolumeFormat` entry.

One module per format (:mod:`~melecole.io.formats.hdf5`, :mod:`~melecole.io.formats.zarr`,
:mod:`~melecole.io.formats.precomputed`) holds its reader (``open``), its writer (``create``, None when
read-only) and its capabilities; :mod:`melecole.io.volumes` dispatches through this table and the rest
of MeLeCoLe asks capabilities (``writable``, ``has_keys``, ``keys_are_folders``, ``is_local``,
``is_renamable``) instead of testing format names. The third-party storage libraries (h5py, zarr,
cloudvolume) are imported only inside :mod:`melecole.io`, lazily, on first use.

To add a format: write its module with a ``FORMAT`` entry, add it here, and teach
:func:`melecole.io.volumes.parse_volume_url` its URLs.
"""

from __future__ import annotations

from melecole.errors import ConfigError
from melecole.io.formats import hdf5, precomputed, zarr
from melecole.io.formats.base import LazyVolume, VolumeFormat, VolumeSpec, VolumeWriter

__all__ = ["FORMATS", "LazyVolume", "VolumeFormat", "VolumeSpec", "VolumeWriter", "format_modules", "volume_format"]

FORMATS: dict[str, VolumeFormat] = {entry.name: entry for entry in (hdf5.FORMAT, zarr.FORMAT, precomputed.FORMAT)}


def volume_format(name: str) -> VolumeFormat:
    """The registry entry of format ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if name not in FORMATS:
        raise ConfigError(f"volume format {name!r} is not a known format; valid: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def format_modules(*names: str) -> tuple[str, ...]:
    """The third-party modules that formats ``names`` (all formats when none is given) import on first use:
    a worker process may import them up front (:func:`importlib.import_module`)."""
    entries = [volume_format(name) for name in names] if names else list(FORMATS.values())
    return tuple(module for entry in entries for module in entry.modules)
