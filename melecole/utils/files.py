"""Atomic writes: write to a temporary name in the same folder, then rename into place.

Every temporary that MeLeCoLe writes is named by :func:`temporary_name`, ``.<name>.<8 hex>.tmp`` beside
the final path: files, folders (zarr arrays, precomputed layers) and the previous version of a folder
being replaced. :data:`TEMPORARY_NAME` matches exactly these names; the stale-temporary cleaners
(:func:`melecole.io.checks.is_stale_temporary`, the run folder's) remove nothing else.

The implementation lives here, below every other layer, so that the config, engine and io layers share
it; :mod:`melecole.io.atomic` re-exports it for the volume writers.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

__all__ = [
    "TEMPORARY_NAME",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_path",
    "replace_folder",
    "temporary_name",
]

TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: ``<folder>/.<name>.<8 random hex>.tmp`` (nothing is created)."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _new_temporary_file(path: Path) -> Path:
    """Creates an empty temporary file beside ``path`` (exclusively; permissions 0666 & ~umask)."""
    for _ in range(100):
        temporary = temporary_name(path)
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"no free temporary name beside '{path}'")


def remove_path(path: str | os.PathLike) -> None:
    """Removes a file, symlink or folder tree if it exists (errors are ignored: best effort cleanup)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def replace_folder(temporary: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames the folder ``temporary`` to ``final``; an existing ``final`` is renamed aside first (to a
    :func:`temporary_name`), then deleted, so ``final`` always names a complete folder or nothing."""
    final = Path(final)
    old = None
    if os.path.lexists(final):
        old = temporary_name(final)
        os.replace(final, old)
    os.replace(temporary, final)
    if old is not None:
        remove_path(old)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Args:
        path: the final file or folder (its parent folders are created).
        folder: False: the temporary is an empty file created here (0666 & ~umask); True: the block
            creates the temporary folder, which then replaces ``path`` (:func:`replace_folder`).

    An interrupted or failing write leaves any previous file or folder under ``path`` untouched and no
    partial one under the final name; the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path) if folder else _new_temporary_file(path)
    try:
        yield temporary
        if folder:
            replace_folder(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            remove_path(temporary)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
