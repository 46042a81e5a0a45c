"""Checks before and after the work: finite raw, writable output folders apart from the inputs, stale
temporaries, result origin.

- :func:`check_finite`: refuses raw with NaN / Inf (one NaN voxel would make the intensity range,
  and so every prediction, NaN).
- :func:`check_writable_folder`: a folder that can be created or written, checked before any compute
  (nothing is created).
- :func:`remove_stale_temporaries`: removes temporary files that a killed write of MeLeCoLe left
  behind (only MeLeCoLe's own temporary names; files in use are kept).
- :func:`check_disjoint`: an output that is, contains or lies inside an input (resolved paths, so
  symlinks count) is refused before any work.
- :func:`read_fingerprint` / :func:`check_same_fingerprint`: result files record the JSON
  ``fingerprint`` of the prediction they come from; readers refuse files of different predictions.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from melecole.errors import DataError
from melecole.io.atomic import LEGACY_TEMPORARY_NAME, TEMPORARY_NAME
from melecole.io.formats.hdf5 import open_hdf5
from melecole.io.volumes import parse_volume_url

__all__ = [
    "FINGERPRINT_ATTRIBUTE",
    "check_disjoint",
    "check_finite",
    "check_same_fingerprint",
    "check_writable_folder",
    "is_stale_temporary",
    "output_error",
    "read_fingerprint",
    "remove_stale_temporaries",
    "resolved_location",
]

FINGERPRINT_ATTRIBUTE = "fingerprint"
# Temporary names: this version's (melecole.io.atomic.temporary_name, ".<name>.<8 hex>.tmp": files, folders and
# folders moved aside during a replace) and, so that their leftovers are cleaned too, those of earlier versions.
_TEMPORARY_NAMES = re.compile(f"{TEMPORARY_NAME.pattern}|{LEGACY_TEMPORARY_NAME.pattern}")


def check_finite(array: np.ndarray, where: str) -> None:
    """Raises a one-line DataError if ``array`` (any shape) holds NaN or Inf; ``where`` names it."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(array)))
        raise DataError(
            f"{where}: {bad} non-finite value{'s' if bad > 1 else ''} ({nan} NaN, {bad - nan} Inf) "
            f"of {array.size}, expected finite intensities (fill or mask them first)"
        )


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Checks that ``folder`` exists as a writable folder or can be created; creates nothing.

    Args:
        folder: the output folder.
        what: names it in the message (a flag or "results folder '...'").

    Raises:
        DataError: a part of the path is a file, or the nearest existing folder is not writable.
    """
    path = Path(os.path.abspath(folder))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{what}: '{existing}' is a file, expected a folder (or a path that can be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{what}: folder '{existing}' is not writable, expected a writable folder")


def output_error(path: str | os.PathLike, error: OSError) -> DataError:
    """A one-line DataError for a failed write of ``path`` (full disk, quota, permission, ...)."""
    reason = os.strerror(error.errno) if error.errno else (error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        expected = "free disk space (or a smaller output)"
    else:
        expected = "a writable output"
    return DataError(f"output '{path}': cannot write ({reason}), expected {expected}; the temporary file was removed")


def _newest_mtime(folder: Path, limit: int = 10000) -> float:
    """The latest modification time of ``folder`` and (up to ``limit`` of) the entries below it."""
    newest = folder.lstat().st_mtime
    seen = 0
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            seen += 1
            if seen >= limit:
                return newest
    return newest


def is_stale_temporary(path: Path, min_age_s: float = 2.0) -> bool:
    """True for a MeLeCoLe temporary that no writer uses: the right name, nothing in it modified
    for ``min_age_s`` seconds and, for files, not locked (HDF5 and
    :func:`melecole.io.hdf5_output.create_hdf5` lock a file while they write it)."""
    if not _TEMPORARY_NAMES.match(path.name):
        return False
    try:
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            return False
        if time.time() - (_newest_mtime(path) if path.is_dir() else path.lstat().st_mtime) < min_age_s:
            return False
        if path.is_dir():
            return True
        with open(path, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
        return True
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike, min_age_s: float = 2.0) -> list[Path]:
    """Removes stale MeLeCoLe temporaries (:func:`is_stale_temporary`) directly inside ``folder``.

    Returns:
        The removed paths (nothing else is touched; a missing folder gives []).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not is_stale_temporary(path, min_age_s):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def read_fingerprint(url: str | os.PathLike) -> str | None:
    """The ``fingerprint`` attribute of an HDF5 result file (``file.hdf`` or ``file.hdf:key``), else None."""
    try:
        parsed = parse_volume_url(url)
    except DataError:
        return None
    if parsed.format != "hdf5" or not Path(parsed.path).is_file():
        return None
    try:
        with open_hdf5(parsed.path) as handle:
            value = handle.attrs.get(FINGERPRINT_ATTRIBUTE)
    except (DataError, OSError):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def check_same_fingerprint(files: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuses result files computed from different predictions.

    Args:
        files: {role (e.g. "--segmentation"): URL or None}; files without a fingerprint are skipped.

    Raises:
        DataError: two files carry different fingerprints (the message names both).
    """
    seen: list[tuple[str, str | os.PathLike, str]] = []
    for role, url in files.items():
        if url is None:
            continue
        value = read_fingerprint(url)
        if value is None:
            continue
        for other_role, other_url, other_value in seen:
            if other_value != value:
                raise DataError(
                    f"{other_role} '{other_url}' and {role} '{url}': different fingerprints (they come from "
                    "different checkpoints, configs or inputs), expected results of one inference run "
                    "(rerun infer.py)"
                )
        seen.append((role, url, value))


def resolved_location(url: str | os.PathLike) -> Path | None:
    """Where a volume URL lives on this machine, symlinks resolved: zarr root / key, the HDF5 file, or a
    local precomputed layer, or any other local file (a checkpoint); None for remote volumes."""
    try:
        parsed = parse_volume_url(url)
    except DataError:
        return Path(os.fspath(url)).expanduser().resolve()
    if not parsed.is_local:
        return None
    return parsed.array_path.expanduser().resolve()


def _overlap(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output in source.parents:
        return "contains"
    if source in output.parents:
        return "lies inside"
    return None


def check_disjoint(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], what: str) -> None:
    """Refuses an output that is, contains or lies inside an input.

    Args:
        output: the output URL (or a local path).
        inputs: {role (e.g. "--affinities"): URL or None}.
        what: names the output in the message.

    Raises:
        DataError: the output overlaps an input (the message names both).
    """
    target = resolved_location(output)
    if target is None:
        return
    for role, url in inputs.items():
        if url is None:
            continue
        source = resolved_location(url)
        relation = _overlap(target, source) if source is not None else None
        if relation:
            raise DataError(
                f"{what}: '{target}' {relation} the input {role} '{url}', expected an output apart from every "
                "input (nothing was touched)"
            )
