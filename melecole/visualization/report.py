"""Headless PNG report: per chosen z-slice, raw | GT overlay | segmentation overlay | error map.

The error map marks the voxels of the worst merge offenders (predicted segments spanning several
GT objects; warm colours) and split offenders (GT objects cut into several segments; cool
colours), as ranked by :func:`melecole.evaluation.evaluate_segmentation`. Rendering uses
matplotlib's Agg canvas directly (no pyplot, no display) and the file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.utils.files import atomic_path
from melecole.utils.images import label_image
from melecole.visualization.viewer import crop_symmetric, crop_to_labels, infer_padding

__all__ = ["choose_slices", "overlay", "error_map", "render_report", "MERGE_COLOURS", "SPLIT_COLOURS"]

ArrayLike = Any

# One colour per offender rank; merges warm, splits cool.
MERGE_COLOURS = np.array(
    [[230, 25, 25], [255, 140, 0], [255, 225, 25], [240, 50, 230], [170, 110, 40]], np.uint8
)
SPLIT_COLOURS = np.array(
    [[0, 130, 255], [0, 220, 220], [120, 80, 255], [60, 200, 75], [0, 70, 160]], np.uint8
)


def choose_slices(depth: int, slices: Sequence[int] | None = None, count: int = 4) -> list[int]:
    """The z indices to show: ``slices`` checked against ``depth``, or ``count`` evenly spaced ones.

    Raises:
        DataError: a requested slice is outside [0, depth).
    """
    if slices:
        chosen = [int(s) for s in slices]
        outside = [s for s in chosen if not 0 <= s < depth]
        if outside:
            raise DataError(f"--slices {outside} outside the labelled volume (z in 0..{depth - 1})")
        return chosen
    count = max(1, min(int(count), depth))
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, count + 2)[1:-1]}) or [depth // 2]


def _grey(raw_slice: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    """(Y, X) raw -> (Y, X, 3) float in [0, 1]; mid grey without raw."""
    if raw_slice is None:
        return np.full(tuple(shape) + (3,), 0.5)
    values = raw_slice.astype(np.float64)
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    scaled = np.clip((values - low) / max(high - low, 1e-8), 0.0, 1.0)
    return np.repeat(scaled[..., None], 3, axis=-1)


def overlay(
    raw_slice: np.ndarray | None, labels: np.ndarray, alpha: float = 0.5, seed: int = 0
) -> np.ndarray:
    """(Y, X) labels over (Y, X) raw -> (Y, X, 3) uint8; label 0 shows the raw only."""
    base = _grey(raw_slice, labels.shape)
    colours = label_image(labels, seed=seed).astype(np.float64) / 255.0
    mask = (labels != 0)[..., None]
    mixed = np.where(mask, (1 - alpha) * base + alpha * colours, base)
    return (mixed * 255).round().astype(np.uint8)


def error_map(
    raw_slice: np.ndarray | None,
    segmentation: np.ndarray,
    gt: np.ndarray,
    merge_labels: Sequence[int],
    split_labels: Sequence[int],
    alpha: float = 0.6,
) -> np.ndarray:
    """(Y, X, 3) uint8: dimmed raw, merge offenders' segments warm, split offenders' GT objects cool.

    Only evaluated voxels (GT != 0) are marked; where a merge and a split overlap, colours mix.
    """
    base = 0.6 * _grey(raw_slice, gt.shape)
    paint = np.zeros(gt.shape + (3,))
    weight = np.zeros(gt.shape + (1,))
    evaluated = gt != 0
    for rank, label in enumerate(split_labels):
        mask = (gt == label)[..., None]
        paint += mask * SPLIT_COLOURS[rank % len(SPLIT_COLOURS)] / 255.0
        weight += mask
    for rank, label in enumerate(merge_labels):
        mask = ((segmentation == label) & evaluated)[..., None]
        paint += mask * MERGE_COLOURS[rank % len(MERGE_COLOURS)] / 255.0
        weight += mask
    marked = weight > 0
    colour = np.divide(paint, weight, out=np.zeros_like(paint), where=marked)
    mixed = np.where(marked, (1 - alpha) * base + alpha * colour, base)
    return (mixed * 255).round().astype(np.uint8)


def _describe(offenders: Sequence[Any], unit: str, merge: bool) -> list[str]:
    lines = []
    for offender in offenders:
        what = "GT objects" if merge else "segments"
        lines.append(
            f"{'segment' if merge else 'GT'} {offender.label}: {offender.n_partners} {what}, "
            f"{offender.vi_contribution:.3f} {unit}"
        )
    return lines


def _report_inputs(
    gt: ArrayLike, segmentation: ArrayLike, raw: ArrayLike | None, padding: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, ArrayLike | None]:
    """(Z, Y, X) GT and segmentation arrays, and the raw cropped to them (None without raw).

    Raises:
        DataError: shapes that do not fit.
    """
    if len(gt.shape) != 3 or len(segmentation.shape) != 3:
        raise DataError(
            f"segmentation shape {tuple(segmentation.shape)} and GT shape {tuple(gt.shape)} must both be (Z, Y, X)"
        )
    label_shape = tuple(min(int(a), int(b)) for a, b in zip(gt.shape, segmentation.shape))
    gt_array = np.asarray(crop_symmetric(gt, label_shape, "gt"))  # padding is cropped, as in the evaluation
    segmentation_array = np.asarray(crop_symmetric(segmentation, label_shape, "segmentation"))
    if raw is not None:
        if padding is None:
            padding = infer_padding(raw.shape, gt_array.shape)
        raw = crop_to_labels(raw, gt_array.shape, padding, "raw")
    return gt_array, segmentation_array, raw


def _slice_panels(
    raw_slice: np.ndarray | None, segmentation: np.ndarray, gt: np.ndarray, scores: Any
) -> list[np.ndarray]:
    """The four (Y, X, 3) uint8 images of one z-slice: raw, GT overlay, segmentation overlay, error map."""
    merge_labels = [o.label for o in scores.merge_offenders]
    split_labels = [o.label for o in scores.split_offenders]
    return [
        (_grey(raw_slice, gt.shape) * 255).astype(np.uint8),
        overlay(raw_slice, gt, seed=1),
        overlay(raw_slice, segmentation, seed=2),
        error_map(raw_slice, segmentation, gt, merge_labels, split_labels),
    ]


def _show_panel(axis: Any, image: np.ndarray, header: str | None, z: int | None) -> None:
    """Draws one (Y, X, 3) image without ticks; ``header`` titles the column, ``z`` labels the row."""
    axis.imshow(image, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if header is not None:
        axis.set_title(header, fontsize=9)
    if z is not None:
        axis.set_ylabel(f"z = {z}", fontsize=9)


def _annotate(figure: Any, scores: Any, title: str | None) -> None:
    """Adds the title with the scores and the offender legend, then lays the figure out."""
    summary = (
        f"VI split {scores.vi_split:.3f}  VI merge {scores.vi_merge:.3f} {scores.unit}   "
        f"adapted Rand {scores.arand:.3f}   {scores.n_seg} segments / {scores.n_gt} GT objects"
    )
    figure.suptitle(f"{title}\n{summary}" if title else summary, fontsize=10)
    legend = [
        "merges: " + ("; ".join(_describe(scores.merge_offenders, scores.unit, True)) or "none"),
        "splits: " + ("; ".join(_describe(scores.split_offenders, scores.unit, False)) or "none"),
    ]
    figure.text(0.01, 0.01, "\n".join(legend), fontsize=7, family="monospace", va="bottom")
    figure.tight_layout(rect=(0, 0.6 / figure.get_figheight(), 1, 1 - 0.5 / figure.get_figheight()))


def render_report(
    path: str | os.PathLike,
    *,
    gt: ArrayLike,
    segmentation: ArrayLike,
    raw: ArrayLike | None = None,
    slices: Sequence[int] | None = None,
    padding: Sequence[int] | None = None,
    top_k: int = 3,
    num_slices: int = 4,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Writes the PNG montage and returns its path.

    Args:
        path: output .png (written atomically).
        gt, segmentation: (Z, Y, X) integer labels (read whole: the scores need every voxel); the
            larger is center-cropped to the smaller when they differ by a symmetric padding.
        raw: (Z, Y, X) raw, possibly padded by ``padding`` per side; only the shown slices are read.
        slices: z indices (label coordinates); default ``num_slices`` evenly spaced.
        padding: raw context per side; None = inferred from the shapes.
        top_k: merge and split offenders marked in the error map.
        title: first line of the figure title (default: the scores only).
        dpi: resolution of the PNG; each panel is about 3 inches wide.

    Raises:
        DataError: shapes that do not fit, or slices outside the volume.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from melecole.evaluation import evaluate_segmentation

    gt_array, segmentation_array, raw = _report_inputs(gt, segmentation, raw, padding)
    scores = evaluate_segmentation(segmentation_array, gt_array, top_k=top_k)
    chosen = choose_slices(gt_array.shape[0], slices, num_slices)

    height, width = gt_array.shape[1:]
    panel = 3.0
    figure = Figure(figsize=(4 * panel, len(chosen) * panel * height / width + 1.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(chosen), 4, squeeze=False)
    headers = ["raw", "ground truth", "segmentation", f"errors: top {top_k} merges (warm) / splits (cool)"]
    for row, z in enumerate(chosen):
        raw_slice = np.asarray(raw[z]) if raw is not None else None
        images = _slice_panels(raw_slice, segmentation_array[z], gt_array[z], scores)
        for column, image in enumerate(images):
            _show_panel(axes[row, column], image, headers[column] if row == 0 else None, z if column == 0 else None)
    _annotate(figure, scores, title)
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path
