"""Atomic writes: write to a temporary name in the same folder, then rename into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    An interrupted or failing write leaves any previous file under ``path`` untouched and no
    partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        if temporary.exists():
            # mkstemp creates 0600 files; give the result the usual permissions (0666 & ~umask)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
