"""File-level evaluation behind ``variation_of_information.py``: HDF5 input, text table, JSON, histogram."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from melecole.errors import DataError
from melecole.evaluation.baseline import connected_components_baseline
from melecole.evaluation.contingency import ContingencyTable
from melecole.evaluation.metrics import Offender, SegmentationScores, build_table, scores_from_table
from melecole.evaluation.volumes import align_to_gt, foreground_probability
from melecole.io import check_same_fingerprint, open_hdf5_volume, output_error
from melecole.utils.files import atomic_path, atomic_write_text

DEFAULT_GT_KEY = "labels"
DEFAULT_SEGMENTATION_KEY = "segmentation"
DEFAULT_MEMBRANES_KEY = "membranes"


def read_hdf5_volume(
    path: str | os.PathLike, key: str | None, *, default_key: str, role: str
) -> tuple[np.ndarray, str]:
    """Reads one dataset; ``key=None`` means ``default_key``, or the file's only dataset if that is absent.

    Returns:
        ``(array, key actually read)``.

    Raises:
        DataError: the file is missing or not HDF5, or the key is absent (the message lists the keys
            and the option that chooses one).
    """
    option = f"--{role.replace(' ', '-')}-key" if role != "ground truth" else "--gt-key"
    text = os.fspath(path)
    if "://" in text or ".zarr" in text or os.path.isdir(text):
        # a zarr (OME-Zarr image group included) or precomputed volume, e.g. the blockwise output
        from melecole.io import open_volume

        url = text if key is None else f"{text}:{key}"
        return open_volume(url, default_key).read(), key or ""
    volume = open_hdf5_volume(path, key, default_key=default_key, hint=f"choose one with {option}", role=f"{role} file")
    return volume.read(), volume.url.rsplit(":", 1)[1]


def plot_cell_sizes(
    path: str | os.PathLike, segmentation_sizes: np.ndarray, gt_sizes: np.ndarray, *, title: str = ""
) -> Path:
    """Writes a PNG histogram of object sizes (voxels, log scale), predicted vs GT, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    largest = max([1, *(int(s.max()) for s in (segmentation_sizes, gt_sizes) if s.size)])
    bins = np.logspace(0, math.log10(largest) + 0.01, 50)
    for sizes, label in (
        (gt_sizes, f"ground truth ({gt_sizes.size})"),
        (segmentation_sizes, f"prediction ({segmentation_sizes.size})"),
    ):
        if sizes.size:
            axes.hist(sizes, bins=bins, histtype="step", linewidth=1.5, label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_ylim(bottom=0.5)  # a single object stays visible on the log axis
    axes.set_xlabel("object size (voxels on labelled ground truth)")
    axes.set_ylabel("objects")
    axes.set_title(title or "cell sizes")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


@dataclass
class EvaluatedVolume:
    """Scores and table of one evaluated segmentation (the prediction or the baseline)."""

    name: str
    scores: SegmentationScores
    table: ContingencyTable


@dataclass
class EvaluationReport:
    """Everything the CLI prints and writes."""

    results: list[EvaluatedVolume]
    inputs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # printed after the scores (e.g. no histogram)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "notes": self.notes,
            "results": {result.name: result.scores.to_dict() for result in self.results},
        }


def _offender_lines(offenders: list[Offender], *, merge: bool) -> list[str]:
    own, partner = ("seg id", "GT") if merge else ("GT id", "seg")
    lines = [
        f"  {own:>12} {'voxels':>11} {'#' + partner:>6} {'VI ' + ('merge' if merge else 'split'):>9}"
        f"  largest {partner} overlaps (id: voxels)"
    ]
    for offender in offenders:
        partners = ", ".join(f"{pid}: {count}" for pid, count in offender.largest_partners)
        lines.append(
            f"  {offender.label:>12} {offender.size:>11} {offender.n_partners:>6} "
            f"{offender.vi_contribution:>9.4f}  {partners}"
        )
    if not offenders:
        lines.append("  (none)")
    return lines


def format_report(report: EvaluationReport) -> str:
    """The table printed by the CLI."""
    unit = report.results[0].scores.unit
    lines = [f"{role}: {text}" for role, text in report.inputs.get("described", {}).items()]
    lines += report.notes
    header = (
        f"{'':<26}{'VI split':>9}{'VI merge':>10}{'VI total':>10}{'ARAND':>9}{'precision':>11}"
        f"{'recall':>9}{'#GT':>8}{'#seg':>9}"
    )
    lines += ["", header]
    for result in report.results:
        s = result.scores
        lines.append(
            f"{result.name:<26}{s.vi_split:>9.4f}{s.vi_merge:>10.4f}{s.vi_total:>10.4f}{s.arand:>9.4f}"
            f"{s.rand_precision:>11.4f}{s.rand_recall:>9.4f}{s.n_gt:>8}{s.n_seg:>9}"
        )
    first = report.results[0].scores
    convention = (
        "original MeLeCoLe convention: natural log, voxels 0 in either volume ignored"
        if first.compat_original
        else "GT label 0 ignored, predicted 0 is an ordinary segment"
    )
    lines.append(f"VI in {unit}; {convention}; {first.n_voxels} voxels evaluated")
    main = report.results[0]
    lines += ["", f"top merge offenders of {main.name} (predicted ids overlapping several GT objects):"]
    lines += _offender_lines(main.scores.merge_offenders, merge=True)
    lines += ["", f"top split offenders of {main.name} (GT ids split over several predicted segments):"]
    lines += _offender_lines(main.scores.split_offenders, merge=False)
    return "\n".join(lines)


def _describe(path: Path, key: str, array: np.ndarray) -> str:
    return f"{path} [{key}] shape {array.shape} {array.dtype}"


def _read_labels(
    gt_path: Path, gt_key: str | None, segmentation_path: Path, segmentation_key: str | None
) -> tuple[np.ndarray, str, np.ndarray, str, dict[str, str]]:
    """Reads the GT and segmentation label volumes.

    Returns:
        ``(gt, gt key read, segmentation, segmentation key read, description of each by role)``.

    Raises:
        DataError: a file or key is missing, or a volume does not hold integer labels.
    """
    gt, gt_key_used = read_hdf5_volume(gt_path, gt_key, default_key=DEFAULT_GT_KEY, role="ground truth")
    segmentation, segmentation_key_used = read_hdf5_volume(
        segmentation_path, segmentation_key, default_key=DEFAULT_SEGMENTATION_KEY, role="segmentation"
    )
    described = {
        "ground truth": _describe(gt_path, gt_key_used, gt),
        "segmentation": _describe(segmentation_path, segmentation_key_used, segmentation),
    }
    _require_integer_labels(gt, "ground truth", gt_path, gt_key_used)
    _require_integer_labels(segmentation, "segmentation", segmentation_path, segmentation_key_used)
    _require_labelled_voxels(gt, gt_path, gt_key_used)
    return gt, gt_key_used, segmentation, segmentation_key_used, described


def _require_integer_labels(array: np.ndarray, role: str, path: Path, key: str) -> None:
    """Raises DataError unless ``array`` (read from ``path`` [``key``]) holds integer labels; ground
    truth ids must be >= 0 (0 = boundary / unlabelled)."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{role} {path} [{key}] must hold integer labels, got {array.dtype}")
    if role == "ground truth" and np.issubdtype(array.dtype, np.signedinteger) and array.size:
        smallest = int(array.min())
        if smallest < 0:
            raise DataError(
                f"{role} {path} [{key}]: negative ids (smallest {smallest}), "
                "expected ids >= 0 (0 = boundary / unlabelled)"
            )


def _require_labelled_voxels(gt: np.ndarray, path: Path, key: str) -> None:
    """Raises DataError when the ground truth ``path`` [``key``] has no voxel with an object id (> 0)."""
    if not gt.any():
        found = f"all {gt.size} voxels are 0 = boundary / unlabelled" if gt.size else "the dataset is empty"
        raise DataError(
            f"ground truth {path} [{key}]: no labelled voxel ({found}), expected at least one voxel with an "
            "object id > 0 (another file, or another dataset with --gt-key?)"
        )


def _evaluate_volume(
    name: str,
    segmentation: np.ndarray,
    gt: np.ndarray,
    *,
    sources: tuple[str, str],
    log_base: float,
    top_k: int,
    compat_original: bool,
) -> EvaluatedVolume:
    """Contingency table and scores of one (Z, Y, X) segmentation against the aligned GT.

    ``sources``: ("<role> <file> [<key>]" of the segmentation, the same of the ground truth), named
    when no voxel is left to evaluate.
    """
    table = build_table(segmentation, gt, compat_original=compat_original)
    if table.n_voxels == 0:
        volume, truth = sources
        if compat_original and gt.any():
            why = f"every labelled voxel of {truth} is 0 in {volume}, and --compat-original ignores voxels 0"
        else:
            why = f"{truth} has no labelled voxel where it overlaps {volume} (after center-cropping)"
        raise DataError(f"{volume}: no voxel to evaluate ({why}), expected labelled voxels in both volumes")
    scores = scores_from_table(table, log_base=log_base, top_k=top_k, compat_original=compat_original)
    return EvaluatedVolume(name, scores, table)


def _evaluate_baseline(
    membranes_path: Path,
    membranes_key: str | None,
    gt: np.ndarray,
    gt_path: Path,
    threshold: float,
    scoring: dict[str, Any],
    *,
    scoring_sources: tuple[str, str],
    described: dict[str, str],
    notes: list[str],
) -> tuple[EvaluatedVolume, str]:
    """Scores the connected-components baseline of a membranes / foreground file against ``gt``.

    Adds the file's description to ``described`` and any alignment note to ``notes``;
    ``scoring_sources`` names the segmentation and ground truth (see :func:`_evaluate_volume`).

    Returns:
        ``(baseline result, membranes key actually read)``.
    """
    membranes, membranes_key_used = read_hdf5_volume(
        membranes_path, membranes_key, default_key=DEFAULT_MEMBRANES_KEY, role="membranes"
    )
    described["membranes"] = _describe(membranes_path, membranes_key_used, membranes)
    probability = foreground_probability(membranes, name=f"membranes {membranes_path} [{membranes_key_used}]")
    probability, gt_for_baseline, baseline_alignment = align_to_gt(
        probability, gt, volume_name=f"membranes {membranes_path}", gt_name=f"ground truth {gt_path}"
    )
    if baseline_alignment.changed:
        notes.append("alignment: " + baseline_alignment.describe("membranes", "ground truth"))
    baseline = connected_components_baseline(probability, threshold)
    name = f"CC baseline (p > {threshold:g})"
    sources = (f"CC baseline of membranes {membranes_path} [{membranes_key_used}]", scoring_sources[1])
    return _evaluate_volume(name, baseline, gt_for_baseline, sources=sources, **scoring), membranes_key_used


def evaluate_files(
    gt_path: str | os.PathLike,
    segmentation_path: str | os.PathLike,
    *,
    membranes_path: str | os.PathLike | None = None,
    gt_key: str | None = None,
    segmentation_key: str | None = None,
    membranes_key: str | None = None,
    threshold: float = 0.5,
    log_base: float = 2.0,
    compat_original: bool = False,
    top_k: int = 10,
    histogram_path: str | os.PathLike | None = None,
) -> EvaluationReport:
    """Evaluates a segmentation file (and optionally the CC baseline of a foreground file) against GT.

    Writes the cell-size histogram to ``histogram_path`` (default ``<seg stem>_cell_sizes.png``
    beside the segmentation); if that fails, ``report.warnings`` says so. Shapes are aligned with
    :func:`align_to_gt`: a volume larger than the other by a symmetric padding is center-cropped.

    Raises:
        DataError: unreadable inputs, shapes that do not fit, negative ground-truth ids, a ground truth
            without labelled voxels (or none left after alignment), or a segmentation and membranes
            file from different inference runs (fingerprints differ).
    """
    gt_path, segmentation_path = Path(gt_path), Path(segmentation_path)
    check_same_fingerprint({"--segmentation": segmentation_path, "--membranes": membranes_path})
    if compat_original:
        log_base = math.e
    gt, gt_key_used, segmentation, segmentation_key_used, described = _read_labels(
        gt_path, gt_key, segmentation_path, segmentation_key
    )
    notes: list[str] = []
    segmentation, gt_for_segmentation, alignment = align_to_gt(
        segmentation, gt, volume_name=f"segmentation {segmentation_path}", gt_name=f"ground truth {gt_path}"
    )
    if alignment.changed:
        notes.append("alignment: " + alignment.describe("segmentation", "ground truth"))
    inputs: dict[str, Any] = {
        "gt": str(gt_path),
        "gt_key": gt_key_used,
        "segmentation": str(segmentation_path),
        "segmentation_key": segmentation_key_used,
        "segmentation_crop_per_side": list(alignment.volume_crop),
        "gt_crop_per_side": list(alignment.gt_crop),
        "log_base": log_base,
        "compat_original": compat_original,
        "described": described,
    }
    scoring = {"log_base": log_base, "top_k": top_k, "compat_original": compat_original}
    sources = (f"segmentation {segmentation_path} [{segmentation_key_used}]", f"ground truth {gt_path} [{gt_key_used}]")
    results = [_evaluate_volume("segmentation", segmentation, gt_for_segmentation, sources=sources, **scoring)]
    if membranes_path is not None:
        membranes_path = Path(membranes_path)
        baseline, membranes_key_used = _evaluate_baseline(
            membranes_path, membranes_key, gt, gt_path, threshold, scoring, scoring_sources=sources,
            described=described, notes=notes,
        )
        results.append(baseline)
        inputs.update(membranes=str(membranes_path), membranes_key=membranes_key_used, threshold=threshold)

    report = EvaluationReport(results=results, inputs=inputs, notes=notes)
    if histogram_path is None:
        histogram_path = segmentation_path.with_name(f"{segmentation_path.stem}_cell_sizes.png")
    _write_histogram(report, Path(histogram_path), segmentation_path.name)
    return report


def _write_histogram(report: EvaluationReport, path: Path, name: str) -> None:
    """The cell-size PNG; a folder that cannot be written becomes a warning of the report (the
    scores stand without the picture)."""
    table = report.results[0].table
    try:
        plot_cell_sizes(path, table.segmentation_sizes, table.gt_sizes, title=f"cell sizes: {name}")
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        report.warnings.append(
            f"{path}: cell-size histogram not written ({reason}); choose another path with --histogram"
        )
        return
    report.notes.append(f"cell-size histogram: {path}")
    report.inputs["histogram"] = str(path)


def write_json(report: EvaluationReport, path: str | os.PathLike) -> None:
    """All numbers of the report as JSON, written atomically (a failed write is a one-line DataError)."""
    try:
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as error:
        raise output_error(path, error) from None
