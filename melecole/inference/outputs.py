"""Inference outputs: names, HDF5 result files, the cache fingerprint, probability encoding.

Output layout (docs/ARCHITECTURE.md), per volume, under ``<run dir>/results/<checkpoint stem>/``:

    <prefix>_affinities.hdf    'affinities'   float16 (C, Z, Y, X), attrs offsets (JSON) etc.
    <prefix>_membranes.hdf     'membranes'    float16 (Z, Y, X) foreground probability
                                              (P(inside a neuron); the membrane map is 1 - it)
    <prefix>_segmentation.hdf  'segmentation' uint64 (Z, Y, X), MWS at INFERENCE.MWS_BACKGROUND,
                               'segmentation_t0.30', ... one more per extra threshold

Affinities and foreground are stored as float16 (half the space; error < 5e-4) and segmentations
are always computed from the stored values, so a run that reuses them gives the same labels as the
run that wrote them. Every file carries a JSON ``fingerprint`` attribute: the prediction options
(:meth:`~melecole.inference.options.PredictOptions.fingerprint`), the checkpoint's content hash and
iteration, and the input's identity; matching affinity and membrane files are reused.
All files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from melecole.errors import DataError
from melecole.inference.options import PredictOptions
from melecole.io import open_hdf5, output_error
from melecole.io.hdf5_output import create_hdf5

__all__ = [
    "AFFINITIES_KEY",
    "FINGERPRINT_FORMAT",
    "MEMBRANES_KEY",
    "OUTPUT_KINDS",
    "SEGMENTATION_KEY",
    "STORAGE_DTYPE",
    "VolumeResult",
    "file_sha256",
    "fingerprint",
    "matching_foreground",
    "output_paths",
    "read_cached_predictions",
    "results_dir",
    "segmentation_key",
    "write_hdf",
    "write_predictions",
]

FINGERPRINT_FORMAT = "melecole-inference-v3"  # v3: inputs identified by content (SHA-256)
STORAGE_DTYPE = np.float16
AFFINITIES_KEY, MEMBRANES_KEY, SEGMENTATION_KEY = "affinities", "membranes", "segmentation"
# Result kinds, in file-name order: <prefix>_<kind>.hdf holds the dataset of the same name.
OUTPUT_KINDS = (AFFINITIES_KEY, MEMBRANES_KEY, SEGMENTATION_KEY)


@dataclass
class VolumeResult:
    """Where one volume's outputs went, and whether affinities/foreground came from the cache."""

    name: str
    affinities: Path
    membranes: Path
    segmentation: Path
    reused: bool
    segmentation_keys: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""
    resolution: tuple[float, ...] | None = None  # (z, y, x) nm stored with the input raw, if any


def segmentation_key(threshold: float | None) -> str:
    """'segmentation' for INFERENCE.MWS_BACKGROUND (None), 'segmentation_t0.30' for an extra threshold."""
    return SEGMENTATION_KEY if threshold is None else f"{SEGMENTATION_KEY}_t{threshold:.2f}"


def results_dir(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """``<run dir>/results/<checkpoint stem>``; run dir = ``output_dir`` or the checkpoint's run folder."""
    checkpoint_path = Path(checkpoint_path)
    if output_dir is not None:
        run_dir = Path(output_dir)
    elif checkpoint_path.parent.name == "checkpoints":
        run_dir = checkpoint_path.parent.parent
    else:
        run_dir = checkpoint_path.parent
    return run_dir / "results" / checkpoint_path.stem


def output_paths(out_dir: Path, prefix: str) -> dict[str, Path]:
    """{kind: ``<out_dir>/<prefix>_<kind>.hdf``} for every result kind."""
    return {kind: out_dir / f"{prefix}_{kind}.hdf" for kind in OUTPUT_KINDS}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(
    options: PredictOptions,
    checkpoint_sha: str,
    iteration: int,
    input_identity: dict[str, Any],
    region: Sequence[slice],
) -> str:
    """JSON (sorted keys) of everything the stored affinities and foreground depend on."""
    content: dict[str, Any] = {
        "format": FINGERPRINT_FORMAT,
        "checkpoint": {"sha256": checkpoint_sha, "iteration": int(iteration)},
        "input": {**input_identity, "region": [[s.start, s.stop] for s in region]},
        "inference": {**options.fingerprint(), "storage": np.dtype(STORAGE_DTYPE).name},
    }
    return json.dumps(content, sort_keys=True)


def write_hdf(path: str | os.PathLike, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
    """Writes ``{key: (array, dataset attrs)}`` and file ``attrs`` to ``path`` atomically (labels gzip-compressed,
    float probabilities uncompressed: fast block reads).

    Raises:
        DataError: the write failed (full disk, file size limit, permission): one line naming
            ``path``; the temporary file is removed and a previous file under ``path`` is untouched.
    """
    try:
        _write_hdf(path, datasets, attrs)
    except OSError as error:
        raise output_error(path, error) from None


def _write_hdf(path: str | os.PathLike, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
    with create_hdf5(path) as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value
        for key, (array, dataset_attrs) in datasets.items():
            array = np.asarray(array)
            chunks = tuple(min(s, c) for s, c in zip(array.shape, (1,) * (array.ndim - 3) + (16, 128, 128)))
            # Probabilities are stored uncompressed: gzip saved ~40 % of their size, but decoding it was about
            # half of a blockwise run on them (every block decodes its chunks, halos included).
            packed = {} if array.dtype.kind == "f" else {"compression": "gzip", "compression_opts": 4, "shuffle": True}
            dataset = handle.create_dataset(key, data=array, chunks=chunks, **packed)
            for name, item in dataset_attrs.items():
                dataset.attrs[name] = item


def write_predictions(
    paths: dict[str, Path],
    affinities: np.ndarray,
    foreground: np.ndarray,
    offsets: Sequence[Sequence[int]],
    attrs: dict,
) -> None:
    """The affinity and membrane files, each with the fingerprint ``attrs``."""
    affinity_attrs = {
        "offsets": json.dumps([list(o) for o in offsets]),
        "invalid_value": 0.0,
        "description": "P(p and p + offsets[c] in one object); 0 for pairs leaving the volume",
    }
    write_hdf(paths[AFFINITIES_KEY], {AFFINITIES_KEY: (affinities, affinity_attrs)}, attrs)
    foreground_attrs = {"description": "P(voxel inside a neuron); membrane probability = 1 - it"}
    write_hdf(paths[MEMBRANES_KEY], {MEMBRANES_KEY: (foreground, foreground_attrs)}, attrs)


def read_cached_predictions(paths: dict[str, Path], expected: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored (affinities, foreground) if both files exist with fingerprint ``expected``, else None."""
    arrays = []
    for key in (AFFINITIES_KEY, MEMBRANES_KEY):
        path = paths[key]
        if not path.is_file():
            return None
        try:
            with open_hdf5(path) as handle:
                if handle.attrs.get("fingerprint") != expected or key not in handle:
                    return None
                arrays.append(handle[key][()])
        except (OSError, DataError):  # unreadable leftovers are simply recomputed
            return None
    return arrays[0], arrays[1]


def matching_foreground(affinities_url: str) -> str | None:
    """The foreground ``infer.py`` stored with these affinities, as a volume URL, or None.

    ``<prefix>_affinities.hdf`` written by ``infer.py`` (its dataset ``affinities``, a fingerprint of
    this format) has a ``<prefix>_membranes.hdf`` beside it with the same fingerprint: the foreground
    probability of the same prediction, which the watershed of ``infer.py`` masks with
    (INFERENCE.MWS_BACKGROUND). Anything else (another file name, another writer, a membrane file of
    another prediction) gives None.
    """
    from melecole.io.checks import read_fingerprint
    from melecole.io.volumes import parse_volume_url

    try:
        url = parse_volume_url(affinities_url)
    except DataError:  # not a URL this helper understands: no foreground to offer
        return None
    suffix = f"_{AFFINITIES_KEY}.hdf"
    if url.format != "hdf5" or url.key not in (None, AFFINITIES_KEY) or not url.path.endswith(suffix):
        return None
    path = Path(url.path)
    sibling = output_paths(path.parent, path.name[: -len(suffix)])[MEMBRANES_KEY]
    value = read_fingerprint(path)
    if value is None or value != read_fingerprint(sibling):
        return None
    try:
        if json.loads(value).get("format") != FINGERPRINT_FORMAT:
            return None
        with open_hdf5(sibling) as handle:
            if MEMBRANES_KEY not in handle:
                return None
    except (TypeError, ValueError, AttributeError, OSError, DataError):
        return None
    return f"{sibling}:{MEMBRANES_KEY}"
