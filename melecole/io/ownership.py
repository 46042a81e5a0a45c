"""Whose output is it: the library's own-output mark, input/output overlap, one run per output.

Users' data is never deleted, replaced or rewritten unless MeLeCoLe wrote it:

- :func:`own_attributes` is the mark every zarr / precomputed output carries (a ``melecole`` entry in its
  attributes or ``info``: writer, version, kind, and for blockwise outputs the fingerprint of the run).
  :func:`check_replaceable` lets ``--overwrite`` replace only a folder with that mark whose entries are all
  zarr metadata or chunks; anything else is refused, naming what is there.
- :func:`melecole.io.checks.check_disjoint`: an output that is, contains or lies inside an input is
  refused before any work, whatever the flags (resolved paths: symlinks count; HDF5, zarr, precomputed).
- :class:`OutputLock`: an exclusive ``flock`` on a lock file in the run's work folder, holding the owner's
  host and pid. The kernel drops the lock when the owner dies (kill -9 included), so a stale lock is taken
  over with a line saying so, and a second run on the same output is refused in one line.

Nothing here imports zarr (its metadata is JSON, read directly) or the volume readers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable

from melecole.errors import DataError

__all__ = [
    "OWN_KEY",
    "OutputLock",
    "check_replaceable",
    "own_attributes",
    "read_own_attributes",
]

OWN_KEY = "melecole"
# Entries of a zarr array folder (v2: .zarray/.zattrs and chunk keys "0.0.0" or nested "0/0/0";
# v3: zarr.json and chunks under "c/"); a precomputed layer: info, provenance and scale folders.
_ZARR_METADATA = {".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"}
_CHUNK_NAME = re.compile(r"^(\d+([._]\d+)*|c)$")
_PRECOMPUTED_ENTRY = re.compile(r"^(info|provenance|mesh|\d+(\.\d+)?_\d+(\.\d+)?_\d+(\.\d+)?)$")
# What the mesh folder of a precomputed layer holds: its info, label manifests and fragment files.
_MESH_ENTRY = re.compile(r"^(info|\d+:0(:[0-9A-Za-z_.-]+)?)$")


def own_attributes(kind: str, **extra: Any) -> dict[str, Any]:
    """The mark MeLeCoLe writes on its outputs: ``{"melecole": {"writer", "version", "kind", **extra}}``."""
    from melecole import __version__

    return {OWN_KEY: {"writer": "melecole", "version": __version__, "kind": kind, **extra}}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_own_attributes(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``melecole`` entry of a zarr array's attributes or a precomputed ``info``; None without one."""
    folder = Path(folder)
    for name, inner in ((".zattrs", None), ("zarr.json", "attributes"), ("info", None)):
        value = _read_json(folder / name)
        if value is not None and inner:
            value = value.get(inner) if isinstance(value.get(inner), dict) else None
        mark = (value or {}).get(OWN_KEY)
        if isinstance(mark, dict) and mark.get("writer") == "melecole":
            return mark
    return None


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of an output folder that no MeLeCoLe zarr array / precomputed layer holds."""
    precomputed = (folder / "info").is_file()
    pattern = _PRECOMPUTED_ENTRY if precomputed else _CHUNK_NAME
    foreign = []
    for entry in sorted(os.listdir(folder)):
        if entry in _ZARR_METADATA or pattern.match(entry):
            if (folder / entry).is_symlink():
                foreign.append(entry)
            elif precomputed and entry == "mesh":
                mesh = folder / entry
                if not mesh.is_dir():
                    foreign.append(entry)
                else:
                    foreign += [f"mesh/{name}" for name in sorted(os.listdir(mesh))
                                if not _MESH_ENTRY.match(name) or (mesh / name).is_symlink()]
            continue
        foreign.append(entry)
    return foreign


def check_replaceable(path: str | os.PathLike, what: str) -> None:
    """Refuses to replace ``path`` unless MeLeCoLe wrote it (missing paths pass).

    Args:
        path: the output file or folder that ``--overwrite`` would replace.
        what: names the output in the message (e.g. ``--output 'x.zarr'``).

    Raises:
        DataError: ``path`` is a file or symlink, has no MeLeCoLe mark, or holds entries other than
            the array's metadata and chunks.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    expected = "expected a MeLeCoLe output to replace, or a new path (nothing was touched)"
    if path.is_symlink() or not path.is_dir():
        raise DataError(f"{what}: '{path}' is a {'symlink' if path.is_symlink() else 'file'}, {expected}")
    if read_own_attributes(path) is None:
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise DataError(
            f"{what}: '{path}' was not written by MeLeCoLe (no '{OWN_KEY}' attribute; holds: {shown or 'nothing'}), "
            f"{expected}"
        )
    foreign = _foreign_entries(path)
    if foreign:
        raise DataError(
            f"{what}: '{path}' holds entries MeLeCoLe did not write ({', '.join(foreign[:5])}), {expected}"
        )


class OutputLock:
    """One run per output: an exclusive lock on ``<folder>/lock`` while the run lasts.

    The file records host, pid and start time. ``flock`` is released by the kernel when its owner dies,
    so a lock file whose ``flock`` can be taken is stale: it is taken over and ``report`` says so.
    Re-entrant in one process (``infer.py --blockwise`` holds it across prediction and segmentation).
    """

    _held: dict[str, tuple[OutputLock, int]] = {}

    def __init__(self, folder: str | os.PathLike, what: str, report: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.path = self.folder / "lock"
        self.what = what
        self.report = report
        self._handle: Any = None
        self._key = ""

    def _owner(self) -> str:
        info = _read_json(self.path) or {}
        started = info.get("started")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"

    def _open_locked(self) -> Any:
        """Opens the lock file and takes its flock (retrying when the file was replaced meanwhile)."""
        for _ in range(10):
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise DataError(
                        f"{self.what}: another run is writing this output ({self._owner()}; lock {self.path}), "
                        "expected one run per output (wait for it, or stop it first)"
                    ) from None
                raise
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return handle
            handle.close()  # the previous owner removed the file between our open and flock
        raise DataError(f"{self.what}: could not take the lock {self.path}, expected one run per output")

    def __enter__(self) -> OutputLock:
        self._key = key = str(self.folder.resolve())
        if key in self._held:
            lock, depth = self._held[key]
            self._held[key] = (lock, depth + 1)
            return self
        handle = self._open_locked()
        handle.seek(0)
        if handle.read().strip():
            self.report(f"{self.what}: taking over the stale lock of an ended run ({self._owner()})")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record))
        handle.flush()
        self._handle = handle
        self._held[key] = (self, 1)
        return self

    def __exit__(self, *exc: Any) -> None:
        lock, depth = self._held.get(self._key, (None, 0))
        if lock is None:
            return
        if depth > 1:
            self._held[self._key] = (lock, depth - 1)
            return
        del self._held[self._key]
        lock.release()

    def release(self) -> None:
        """Removes the lock file (the folder too when that leaves it empty) and drops the flock."""
        if self._handle is None:
            return
        try:
            self.path.unlink()
            self.folder.rmdir()
        except OSError:
            pass
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
