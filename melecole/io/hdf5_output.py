"""Writing HDF5 files atomically and safely when the disk fills up.

HDF5 cannot recover from a failed write: after a full disk (ENOSPC) or a file size limit (EFBIG,
``ulimit -f``) closing the file crashes the process (segmentation fault). :func:`create_hdf5`
therefore lets HDF5 write through a Python file object that records the first failed write and
quietly drops the rest, so HDF5 always finishes normally; the error is raised afterwards as a
one-line DataError, the temporary file is removed and the final name is left untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Iterator

from melecole.io.atomic import atomic_path
from melecole.io.checks import output_error

__all__ = ["create_hdf5"]


class _GuardedFile:
    """The file object HDF5 writes through (h5py's 'fileobj' driver); remembers the first OSError.

    After a failed write, writes are dropped (the file is discarded anyway) and reads beyond the
    written data return zeros, so HDF5 never sees an error.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readinto(self, buffer: Any) -> int:
        try:
            count = self._handle.readinto(buffer) or 0
        except OSError as error:
            self.error = self.error or error
            count = 0
        view = memoryview(buffer).cast("B")
        view[count:] = bytes(len(view) - count)  # unwritten ranges read as zeros
        return len(view)

    def read(self, size: int = -1) -> bytes:
        data = bytearray(max(size, 0))
        self.readinto(data)
        return bytes(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(view):
                    written += self._handle.write(view[written:]) or 0
            except OSError as error:
                self.error = error
        return len(view)  # HDF5 seeks before every write: the position need not be kept

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._handle.truncate(size)
            except OSError as error:
                self.error = error
        return self._handle.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None:
            try:
                self._handle.flush()
            except OSError as error:
                self.error = error


@contextlib.contextmanager
def create_hdf5(path: str | os.PathLike) -> Iterator[Any]:
    """Yields a new ``h5py.File`` whose content replaces ``path`` only if the block and every write
    succeed.

    The temporary file (``.<name>.<8 hex>.tmp`` beside ``path``, :func:`melecole.io.atomic.temporary_name`)
    is locked while it is written, so a cleanup of stale temporaries
    (:func:`melecole.io.remove_stale_temporaries`) leaves it alone.

    Raises:
        DataError: a write failed (full disk, file size limit): one line naming ``path``.
    """
    import h5py

    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "r+b", buffering=0) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            guarded = _GuardedFile(handle)
            with h5py.File(guarded, "w") as file:
                yield file
            if guarded.error is not None:
                raise output_error(path, guarded.error)
