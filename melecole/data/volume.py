"""Reading HDF5 volumes of the dataset layout in docs/ARCHITECTURE.md: ``<DATA_ROOT>/<split>/*.hdf``.

Each file holds a raw volume (``DATASET.RAW_KEY``, uint8 (z, y, x), possibly padded by
``DATASET.PADDING`` context voxels on each side) and optionally neuron labels
(``DATASET.LABEL_KEY``, integer (z, y, x), 0 = boundary / unlabelled). Volumes are read fully
into memory (SNEMI3D is 100 x 1024 x 1024).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from yacs.config import CfgNode

from melecole.errors import DataError
from melecole.io import (
    HDF5_SUFFIXES,
    check_finite,
    hdf5_dataset_names,
    inner_region,
    intensity_range,
    normalize_raw,
    open_hdf5_volume,
)

__all__ = [
    "Volume",
    "read_volume",
    "normalize_raw",
    "list_volumes",
    "check_data_root",
    "intensity_range",
]

logger = logging.getLogger(__name__)



@dataclass
class Volume:
    """One volume in memory.

    Attributes:
        raw: (Z + 2 pz, Y + 2 py, X + 2 px) raw intensities as stored (usually uint8).
        labels: (Z, Y, X) integer neuron ids, 0 = boundary / unlabelled; None for unlabelled data.
        padding: effective (pz, py, px) context per side: label index i is raw index i + padding.
        path: the file it was read from.
        value_range: (low, high) intensities mapped to 0 and 1 by :func:`melecole.io.normalize_raw`.
    """

    raw: np.ndarray
    labels: np.ndarray | None
    padding: tuple[int, int, int]
    path: Path
    value_range: tuple[float, float] = (0.0, 255.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the labelled region (z, y, x): the label shape, or the unpadded raw shape."""
        if self.labels is not None:
            return tuple(self.labels.shape)  # type: ignore[return-value]
        return tuple(int(s - 2 * p) for s, p in zip(self.raw.shape, self.padding))  # type: ignore[return-value]

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def label_region(self) -> tuple[slice, ...]:
        """Slices of the raw that hold the labelled region (raw index = label index + padding)."""
        return inner_region(self.padding, self.shape)


def _read_dataset(path: Path, key: str, field: str) -> np.ndarray:
    """One 3D dataset, read whole through :func:`melecole.io.open_hdf5_volume` (``field`` names the
    config key that chose it in errors)."""
    volume = open_hdf5_volume(path, key, hint=field)
    if volume.ndim != 3:
        raise DataError(f"file '{path}': '{key}' ({field}) must be 3D (z, y, x), got shape {volume.shape}")
    if min(volume.shape) < 1:
        raise DataError(
            f"file '{path}': '{key}' ({field}) has shape {volume.shape}, expected a non-empty (z, y, x) volume"
        )
    return volume.read()


def _check_labels(path: Path, label_key: str, labels: np.ndarray, warn_unlabelled: bool) -> np.ndarray:
    """Integer, non-negative ids as uint32 / uint64; warns when every voxel is 0 (nothing to learn
    from or to score)."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(
            f"file '{path}': labels '{label_key}' (DATASET.LABEL_KEY) must be integer ids, "
            f"got dtype {labels.dtype}"
        )
    if np.issubdtype(labels.dtype, np.signedinteger):
        if labels.size and labels.min() < 0:
            raise DataError(f"file '{path}': labels '{label_key}' contain negative ids")
        labels = labels.astype(np.uint64 if labels.dtype.itemsize > 4 else np.uint32)
    elif labels.dtype.itemsize < 4:
        labels = labels.astype(np.uint32)
    if warn_unlabelled and not labels.any():
        logger.warning(
            "file '%s': labels '%s' (DATASET.LABEL_KEY) are all 0 (no labelled voxel): "
            "nothing to learn from or to score in this volume",
            path,
            label_key,
        )
    return labels


def read_volume(
    path: str | os.PathLike,
    raw_key: str = "volume",
    label_key: str | None = "labels",
    padding: Sequence[int] = (0, 0, 0),
    *,
    labels_optional: bool = False,
    warn_unlabelled: bool = True,
) -> Volume:
    """Reads one HDF5 volume and checks it against the dataset layout.

    The raw shape must equal ``labels.shape + 2 * padding`` (padded raw) or ``labels.shape``. In the
    second case the raw is taken as unpadded and the effective padding is (0, 0, 0), whatever
    ``padding`` says, so a dataset may mix padded and unpadded files. Without labels
    (``label_key`` None or "", or absent from the file with ``labels_optional``) the whole raw is
    used and the effective padding is (0, 0, 0). Labels that are all 0 are logged as a warning
    naming the file (unless ``warn_unlabelled`` is False: the caller reports it).

    Raises:
        DataError: the file is missing or not HDF5, a key is missing, an array is not 3D or is
            empty, the raw holds NaN / Inf, the labels are not integers, or the shapes do not fit.
    """
    path = Path(path)
    padding = tuple(int(p) for p in padding)
    if len(padding) != 3 or min(padding) < 0:
        raise DataError(f"DATASET.PADDING must be 3 integers >= 0 (z, y, x), got {list(padding)}")
    raw = _read_dataset(path, raw_key, "DATASET.RAW_KEY")
    if label_key and labels_optional and label_key not in hdf5_dataset_names(path):
        label_key = None
    labels = _read_dataset(path, label_key, "DATASET.LABEL_KEY") if label_key else None
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        raise DataError(f"file '{path}': raw '{raw_key}' has non-numeric dtype {raw.dtype}")
    check_finite(raw, f"file '{path}': raw '{raw_key}' (DATASET.RAW_KEY)")
    if labels is None:
        return Volume(raw=raw, labels=None, padding=(0, 0, 0), path=path, value_range=intensity_range(raw))
    labels = _check_labels(path, label_key, labels, warn_unlabelled)
    if raw.shape == labels.shape:
        if any(padding):
            logger.info("%s: raw and labels have the same shape; using padding (0, 0, 0) for this file", path)
        padding = (0, 0, 0)
    elif tuple(raw.shape) != tuple(s + 2 * p for s, p in zip(labels.shape, padding)):
        raise DataError(
            f"file '{path}': raw shape {tuple(raw.shape)} must equal the label shape {tuple(labels.shape)} "
            f"or label shape + 2 * DATASET.PADDING {list(padding)} = "
            f"{tuple(s + 2 * p for s, p in zip(labels.shape, padding))}"
        )
    return Volume(raw=raw, labels=labels, padding=padding, path=path, value_range=intensity_range(raw))


def list_volumes(data_root: str | os.PathLike, split: str) -> list[Path]:
    """Sorted HDF5 files (*.hdf, *.h5, *.hdf5) in ``<data_root>/<split>``.

    Raises:
        DataError: the folder is missing or holds no HDF5 file.
    """
    folder = Path(data_root) / split
    if not folder.is_dir():
        raise DataError(
            f"DATASET.DATA_ROOT: folder '{folder}' does not exist "
            f"(expected HDF5 volumes in <DATA_ROOT>/{split}/*.hdf)"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
    if not files:
        raise DataError(
            f"DATASET.DATA_ROOT: folder '{folder}' holds no HDF5 volume "
            f"(expected <DATA_ROOT>/{split}/*.hdf, *.h5 or *.hdf5)"
        )
    return files


def check_data_root(cfg: CfgNode, splits: Sequence[str]) -> dict[str, list[Path]]:
    """Checks that ``cfg.DATASET.DATA_ROOT/<split>`` holds volumes for every split; returns their files.

    Only folders and file names are checked (cheap); keys and shapes are checked when read.
    """
    return {split: list_volumes(cfg.DATASET.DATA_ROOT, split) for split in splits}
