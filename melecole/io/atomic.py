"""Atomic writes of MeLeCoLe's outputs: one helper, one temporary-name scheme.

Every output (HDF5 files, zarr arrays, precomputed layers, work files) is written under
:func:`temporary_name` ``.<name>.<8 hex>.tmp`` beside its final path and renamed into place when
complete (:func:`atomic_path` for files and folders, :func:`replace_folder` for a folder replacing an
earlier one). :func:`is_temporary_name` recognises exactly those names, and the names that earlier
versions used, so that :func:`melecole.io.checks.remove_stale_temporaries` cleans their leftovers too.

The implementation is :mod:`melecole.utils.files` (the layer below io: the engine's checkpoints use it too).
"""

from __future__ import annotations

import re

from melecole.utils.files import (
    TEMPORARY_NAME,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    remove_path,
    replace_folder,
    temporary_name,
)

__all__ = [
    "LEGACY_TEMPORARY_NAME",
    "TEMPORARY_NAME",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_temporary_name",
    "remove_path",
    "replace_folder",
    "temporary_name",
]

# Temporaries of earlier versions: tempfile.mkstemp files ".<name>.<8 of [a-z0-9_]>.tmp", folders and work
# files ".<name>.tmp-<8 hex>" (".<stem>.tmp-<8 hex>.npz" for the blockwise graphs), folders moved aside
# during a replace ".<name>.old-<8 hex>".
LEGACY_TEMPORARY_NAME = re.compile(r"^\..+(\.[a-z0-9_]{8}\.tmp|\.tmp-[0-9a-f]{8}(\.npz)?|\.old-[0-9a-f]{8})$")


def is_temporary_name(name: str) -> bool:
    """True for a name that only MeLeCoLe's atomic writes give (this version's or an earlier one's)."""
    return bool(TEMPORARY_NAME.match(name) or LEGACY_TEMPORARY_NAME.match(name))
