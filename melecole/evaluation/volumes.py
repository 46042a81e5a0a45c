"""Volume preparation for evaluation: shape alignment and foreground probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from melecole.errors import DataError
from melecole.io.regions import crop_per_side


@dataclass(frozen=True)
class Alignment:
    """What :func:`align_to_gt` did: per-side crop of the volume and of the GT (both (Z, Y, X))."""

    volume_crop: tuple[int, ...]
    gt_crop: tuple[int, ...]

    @property
    def changed(self) -> bool:
        return any(self.volume_crop) or any(self.gt_crop)

    def describe(self, volume_name: str = "segmentation", gt_name: str = "ground truth") -> str:
        """One line for the CLI, e.g. 'segmentation center-cropped by (20, 64, 64) per side'."""
        parts = []
        if any(self.volume_crop):
            parts.append(f"{volume_name} center-cropped by {self.volume_crop} per side")
        if any(self.gt_crop):
            parts.append(f"{gt_name} center-cropped by {self.gt_crop} per side")
        return "; ".join(parts) if parts else "shapes match"


def align_to_gt(
    volume: np.ndarray,
    gt: np.ndarray,
    padding: Sequence[int] | None = None,
    *,
    volume_name: str = "segmentation",
    gt_name: str = "ground truth",
) -> tuple[np.ndarray, np.ndarray, Alignment]:
    """Center-crops whichever of ``volume`` / ``gt`` is larger on each axis so the shapes match.

    Raw volumes may be padded by DATASET.PADDING context on each side (docs/ARCHITECTURE.md, Dataset layout),
    so a prediction can be larger than its GT by ``2 * padding`` (or a padded GT larger than the
    prediction). Crops are views, nothing is copied.

    Args:
        volume: (Z, Y, X) segmentation or probability volume.
        gt: (Z, Y, X) ground-truth labels.
        padding: expected per-side padding; if given, each axis must differ by 0 or exactly
            ``2 * padding``.
        volume_name, gt_name: file names (or roles) used in error messages.

    Returns:
        ``(volume, gt, alignment)`` with equal shapes.

    Raises:
        DataError: different dimensionality, an odd difference, or one not matching ``padding``.
    """
    if volume.ndim != gt.ndim:
        raise DataError(f"{volume_name} has shape {volume.shape} but {gt_name} has shape {gt.shape}")
    difference = [a - b for a, b in zip(volume.shape, gt.shape)]
    if any(d % 2 for d in difference):
        raise DataError(
            f"{volume_name} shape {volume.shape} does not match {gt_name} shape {gt.shape} "
            f"(difference {tuple(difference)} is not even on every axis, so it is no symmetric padding)"
        )
    if padding is not None:
        padding = tuple(int(p) for p in padding)
        if len(padding) != gt.ndim or any(abs(d) not in (0, 2 * p) for d, p in zip(difference, padding)):
            raise DataError(
                f"{volume_name} shape {volume.shape} does not match {gt_name} shape {gt.shape} "
                f"with padding {padding} per side"
            )
    volume_crop = tuple(max(d, 0) // 2 for d in difference)
    gt_crop = tuple(max(-d, 0) // 2 for d in difference)
    return crop_per_side(volume, volume_crop), crop_per_side(gt, gt_crop), Alignment(volume_crop, gt_crop)


def foreground_probability(array: np.ndarray, *, name: str = "membranes") -> np.ndarray:
    """Foreground probability in [0, 1] (high = inside a neuron) as float32.

    uint8 volumes are scaled from 0..255; a leading singleton channel axis is dropped.

    Raises:
        DataError: other integer dtypes, or float values outside [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == bool:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(
            f"{name} must be a float probability in [0, 1] or uint8 0..255, got dtype {array.dtype}"
        )
    if array.size:
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if low < -1e-6 or high > 1.0 + 1e-6:
            raise DataError(f"{name} must hold probabilities in [0, 1], found values in [{low:g}, {high:g}]")
    return array.astype(np.float32, copy=False)
