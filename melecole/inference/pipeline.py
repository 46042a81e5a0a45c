"""Whole-volume inference: checkpoint + volumes -> affinities, foreground, segmentation files.

Output layout (DESIGN.md), per volume, under ``<run dir>/results/<checkpoint stem>/``:

    <prefix>_affinities.hdf    'affinities'   float16 (C, Z, Y, X), attrs offsets (JSON) etc.
    <prefix>_membranes.hdf     'membranes'    float16 (Z, Y, X) foreground probability
                                              (P(inside a neuron); the membrane map is 1 - it)
    <prefix>_segmentation.hdf  'segmentation' uint64 (Z, Y, X), MWS at INFERENCE.MWS_BACKGROUND,
                               'segmentation_t0.30', ... one more per extra threshold

``<prefix>`` is the split name, ``<split>_<volume stem>`` when the split holds several volumes, or
the input's name for ``--input`` (HDF5 file stem, zarr root stem [+ _key], precomputed layer name;
zarr and precomputed inputs are read through :mod:`melecole.inference.stores`). The run dir is
the checkpoint's run folder (the checkpoint lies in RUN/checkpoints/) or the given output folder.
Outputs cover the labelled region: the raw may carry DATASET.PADDING context, which is used for
prediction and then cropped away.

Affinities and foreground are stored as float16 (half the space; error < 5e-4) and the
segmentation is always computed from these stored values, so a run that reuses them gives the
same labels as the run that wrote them. Every file carries a JSON ``fingerprint`` attribute
(checkpoint content hash and iteration, the inference-relevant config values, the input's
identity: file size and mtime for HDF5, the raw's SHA-256 for zarr / precomputed); matching
affinity and membrane files are reused and only the mutex watershed is redone.
All files are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from yacs.config import CfgNode as CN

from melecole.errors import ConfigError
from melecole.inference.mws import mutex_watershed, mws_weights, number_of_attractive_channels
from melecole.inference.postprocess import postprocess_segmentation
from melecole.inference.sliding_window import default_stride, inference_device, predict_options, predict_volume
from melecole.inference.stores import InputSource, read_input, resolve_input
from melecole.inference.tta import parse_tta
from melecole.utils.io import atomic_path

__all__ = [
    "FINGERPRINT_FORMAT",
    "VolumeResult",
    "run_inference",
    "resolve_windows",
    "results_dir",
    "segmentation_key",
    "write_hdf",
]

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "melecole-inference-v1"
STORAGE_DTYPE = np.float16
AFFINITIES_KEY, MEMBRANES_KEY, SEGMENTATION_KEY = "affinities", "membranes", "segmentation"


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


def resolve_windows(cfg: CN) -> tuple[list[int], list[int], list[int]]:
    """(window, stride, margin) from INFERENCE.* / MODEL.INPUT_SIZE, checked.

    Window: INFERENCE.WINDOW_SIZE or MODEL.INPUT_SIZE; it must suit the UNet's downsampling.
    Stride: INFERENCE.STRIDE, or half the window, lowered where needed so that every affinity pair
    lies in one cropped window (stride <= window - 2 * margin - max |offset| per axis).

    Raises:
        ConfigError: the window does not suit the model, or stride/margin leave pairs uncovered.
    """
    window = list(cfg.INFERENCE.WINDOW_SIZE) or list(cfg.MODEL.INPUT_SIZE)
    z_factor = 2 ** sum(bool(p) for p in cfg.MODEL.POOL_Z)
    xy_factor = 2 ** (len(cfg.MODEL.FILTERS) - 1)
    if window[0] % z_factor or window[1] % xy_factor or window[2] % xy_factor:
        raise ConfigError(
            f"INFERENCE.WINDOW_SIZE {window} must be divisible by ({z_factor}, {xy_factor}, {xy_factor}), "
            f"the downsampling of MODEL.FILTERS/MODEL.POOL_Z"
        )
    margin = list(cfg.INFERENCE.MARGIN)
    reach = [max(abs(int(o[a])) for o in cfg.INFERENCE.OFFSETS) for a in range(3)]
    limit = [w - 2 * m - r for w, m, r in zip(window, margin, reach)]
    if cfg.INFERENCE.STRIDE:
        stride = list(cfg.INFERENCE.STRIDE)
        bad = [a for a in range(3) if stride[a] > limit[a]]
    else:
        stride = default_stride(window, margin, cfg.INFERENCE.OFFSETS)
        bad = [a for a in range(3) if limit[a] < 1]
    if bad:
        raise ConfigError(
            "INFERENCE.STRIDE/INFERENCE.MARGIN: every affinity pair must lie inside one cropped window, "
            "so stride <= window - 2 * margin - max |offset| per axis; "
            + "; ".join(
                f"{'zyx'[a]}: stride {stride[a]}, window {window[a]}, margin {margin[a]}, max offset {reach[a]}"
                for a in bad
            )
        )
    return window, stride, margin


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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(
    cfg: CN,
    checkpoint: dict,
    checkpoint_sha: str,
    input_identity: dict[str, Any],
    region: Sequence[slice],
    windows: tuple,
    amp: bool,
) -> str:
    """JSON (sorted keys) of everything the stored affinities and foreground depend on."""
    window, stride, margin = windows
    content: dict[str, Any] = {
        "format": FINGERPRINT_FORMAT,
        "checkpoint": {"sha256": checkpoint_sha, "iteration": int(checkpoint.get("iteration", -1))},
        "input": {**input_identity, "region": [[s.start, s.stop] for s in region]},
        "model": {
            key: (list(value) if isinstance(value, (list, tuple)) else value) for key, value in cfg.MODEL.items()
        },
        "inference": {
            "offsets": [list(o) for o in cfg.INFERENCE.OFFSETS],
            "window": window,
            "stride": stride,
            "margin": margin,
            "blending": cfg.INFERENCE.BLENDING,
            "norm": cfg.LOSS.NORM,
            "delta_d": cfg.LOSS.DELTA_D,
            "amp": amp,
            "tta": [variant.name for variant in parse_tta(cfg.INFERENCE.TTA)],
            "storage": np.dtype(STORAGE_DTYPE).name,
        },
    }
    return json.dumps(content, sort_keys=True)


def write_hdf(path: str | os.PathLike, datasets: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
    """Writes ``{key: (array, dataset attrs)}`` and file ``attrs`` to ``path`` atomically (gzip)."""
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as handle:
            for key, value in attrs.items():
                handle.attrs[key] = value
            for key, (array, dataset_attrs) in datasets.items():
                array = np.asarray(array)
                chunks = tuple(min(s, c) for s, c in zip(array.shape, (1,) * (array.ndim - 3) + (16, 128, 128)))
                dataset = handle.create_dataset(
                    key, data=array, compression="gzip", compression_opts=4, shuffle=True, chunks=chunks
                )
                for name, item in dataset_attrs.items():
                    dataset.attrs[name] = item


def _write_predictions(
    paths: dict[str, Path], affinities: np.ndarray, foreground: np.ndarray, cfg: CN, attrs: dict
) -> None:
    """The affinity and membrane files, each with the fingerprint ``attrs``."""
    affinity_attrs = {
        "offsets": json.dumps([list(o) for o in cfg.INFERENCE.OFFSETS]),
        "invalid_value": 0.0,
        "description": "P(p and p + offsets[c] in one object); 0 for pairs leaving the volume",
    }
    write_hdf(paths["affinities"], {AFFINITIES_KEY: (affinities, affinity_attrs)}, attrs)
    foreground_attrs = {"description": "P(voxel inside a neuron); membrane probability = 1 - it"}
    write_hdf(paths["membranes"], {MEMBRANES_KEY: (foreground, foreground_attrs)}, attrs)


def _read_cached(paths: dict[str, Path], fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored (affinities, foreground) if both files exist with this fingerprint, else None."""
    arrays = []
    for kind, key in (("affinities", AFFINITIES_KEY), ("membranes", MEMBRANES_KEY)):
        path = paths[kind]
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("fingerprint") != fingerprint or key not in handle:
                    return None
                arrays.append(handle[key][()])
        except OSError:  # unreadable leftovers are simply recomputed
            return None
    return arrays[0], arrays[1]


def _label_region(volume) -> tuple[slice, ...]:
    """Slices of the raw that hold the labelled region (raw index = label index + padding)."""
    return tuple(slice(p, p + s) for p, s in zip(volume.padding, volume.shape))


def _predict(
    model: torch.nn.Module, volume, cfg: CN, windows: tuple, device: torch.device, amp: bool, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window prediction on the whole raw, outputs for the labelled region, as float16."""
    from melecole.data.volume import normalize_raw

    raw = volume.raw if volume.raw.dtype == np.uint8 else normalize_raw(volume.raw, volume.value_range)
    window, stride, margin = windows
    affinities, foreground = predict_volume(
        model,
        raw,
        window=window,
        offsets=cfg.INFERENCE.OFFSETS,
        progress=progress,
        region=_label_region(volume),
        **predict_options(cfg, stride, margin, device, amp),
    )
    stored = np.empty(affinities.shape, dtype=STORAGE_DTYPE)
    for channel in range(affinities.shape[0]):  # channel-wise: no second float32-sized temporary
        stored[channel] = affinities[channel]
    del affinities
    return stored, foreground.astype(STORAGE_DTYPE)


def _segment(
    weights: np.ndarray, foreground: np.ndarray, cfg: CN, thresholds: Sequence[float]
) -> dict[str, tuple[np.ndarray, dict]]:
    """One MWS per threshold on shared edge weights (:func:`mws_weights` of the affinities), each
    post-processed (INFERENCE.MIN_SEGMENT_SIZE, INFERENCE.FILL_BACKGROUND)."""
    offsets = cfg.INFERENCE.OFFSETS
    wanted: dict[str, float] = {segmentation_key(None): cfg.INFERENCE.MWS_BACKGROUND}
    wanted.update({segmentation_key(t): float(t) for t in thresholds})
    done: dict[float, np.ndarray] = {}
    datasets = {}
    for key, threshold in wanted.items():
        if threshold not in done:
            logger.info("mutex watershed (background threshold %.2f)", threshold)
            done[threshold] = mutex_watershed(
                weights,
                offsets,
                foreground=foreground,
                background_threshold=threshold,
                strides=cfg.INFERENCE.MWS_STRIDES,
                randomized=cfg.INFERENCE.MWS_RANDOMIZED_STRIDES,
                weights_ready=True,
            )
            done[threshold] = postprocess_segmentation(
                done[threshold], min_size=cfg.INFERENCE.MIN_SEGMENT_SIZE, fill=cfg.INFERENCE.FILL_BACKGROUND
            )
        datasets[key] = (
            done[threshold],
            {
                "background_threshold": threshold,
                "strides": list(cfg.INFERENCE.MWS_STRIDES),
                "randomized_strides": bool(cfg.INFERENCE.MWS_RANDOMIZED_STRIDES),
                "min_segment_size": int(cfg.INFERENCE.MIN_SEGMENT_SIZE),
                "fill_background": bool(cfg.INFERENCE.FILL_BACKGROUND),
                "num_segments": int(done[threshold].max()),
            },
        )
    return datasets


def _evaluate(datasets: dict[str, tuple[np.ndarray, dict]], labels: np.ndarray) -> dict[str, dict[str, float]]:
    """VI split/merge (bits) and adapted Rand error per segmentation; {} without melecole.evaluation."""
    try:
        from melecole.evaluation import evaluate_segmentation
    except ImportError:
        return {}
    scores = {}
    for key, (segmentation, _) in datasets.items():
        result = evaluate_segmentation(segmentation, labels, top_k=0)
        scores[key] = {"vi_split": result.vi_split, "vi_merge": result.vi_merge, "arand": result.arand}
    return scores


def _volume_jobs(
    cfg: CN, split: str | None, input_path: str | os.PathLike | None, raw_key: str
) -> list[tuple[str, InputSource]]:
    """[(output prefix, input)]: the input URL (prefix: the split if given, else the input's name) or
    every volume of the split (prefix: the split, or <split>_<stem> when it holds several)."""
    from melecole.data.volume import list_volumes

    if input_path is not None:
        source = resolve_input(input_path, raw_key)
        return [(split or source.prefix, source)]
    if split is None:
        raise ConfigError("give a split (--split) or an input file (--input)")
    files = list_volumes(cfg.DATASET.DATA_ROOT, split)
    sources = [InputSource(str(path), path.stem, path, raw_key) for path in files]
    if len(sources) == 1:
        return [(split, sources[0])]
    return [(f"{split}_{source.prefix}", source) for source in sources]


def run_inference(
    cfg: CN,
    checkpoint_path: str | os.PathLike,
    *,
    split: str | None = None,
    input_path: str | os.PathLike | None = None,
    raw_key: str | None = None,
    output_dir: str | os.PathLike | None = None,
    thresholds: Sequence[float] = (),
    overwrite: bool = False,
    evaluate: bool = True,
    progress: bool = True,
) -> list[VolumeResult]:
    """Predicts, caches and segments every volume of ``split`` (or the one ``input_path``).

    Args:
        cfg: merged config; its model-shaping keys must match the checkpoint's.
        checkpoint_path: a checkpoint file, or a run folder (uses checkpoints/last.pt).
        split: infer every HDF5 volume in ``<DATASET.DATA_ROOT>/<split>/``.
        input_path: one volume instead of the split's: an HDF5 file (``file.hdf``, ``file.hdf:key``),
            zarr (``x.zarr[:key]``) or precomputed URL (``precomputed://file:///abs``, ``gs://...``);
            ``split``, if given, only names the outputs. ``raw_key`` overrides DATASET.RAW_KEY.
        output_dir: run folder for results/ (default: the checkpoint's run folder).
        thresholds: extra foreground thresholds; each adds a 'segmentation_tX.XX' dataset.
        overwrite: recompute affinities even if matching cached files exist.
        evaluate: score segmentations against labels when the file has them.
        progress: tqdm bar over windows.

    Raises:
        CheckpointError: missing / unreadable checkpoint, or one trained with a different model shape.
        DataError: missing split folder, input or HDF5 key / zarr array.
        ConfigError: unusable window / stride / margin.
    """
    from melecole.engine.checkpoint import build_model_from_checkpoint

    for threshold in thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--thresholds must lie in [0, 1], got {threshold}")
    windows = resolve_windows(cfg)
    raw_key = raw_key or cfg.DATASET.RAW_KEY
    jobs = _volume_jobs(cfg, split, input_path, raw_key)
    device, amp = inference_device(cfg)
    model, _, checkpoint = build_model_from_checkpoint(checkpoint_path, cfg, device=device)
    checkpoint_file = Path(checkpoint["path"])
    checkpoint_sha = _file_sha256(checkpoint_file)
    out_dir = results_dir(checkpoint_file, output_dir)
    logger.info("checkpoint %s (iteration %s) on %s", checkpoint_file, checkpoint.get("iteration"), device)

    results = []
    for prefix, source in jobs:
        volume, identity, resolution = read_input(source, cfg)
        paths = {kind: out_dir / f"{prefix}_{kind}.hdf" for kind in ("affinities", "membranes", "segmentation")}
        fingerprint = _fingerprint(cfg, checkpoint, checkpoint_sha, identity, _label_region(volume), windows, amp)
        attrs = {"fingerprint": fingerprint, "checkpoint": str(checkpoint_file), "input": source.url}
        cached = None if overwrite else _read_cached(paths, fingerprint)
        reused = cached is not None
        if cached is not None:
            logger.info("%s: reusing cached affinities and foreground from %s", source.url, out_dir)
            affinities, foreground = cached
            del cached
        else:
            logger.info("%s: predicting raw %s -> output %s", source.url, volume.raw.shape, volume.shape)
            affinities, foreground = _predict(model, volume, cfg, windows, device, amp, progress)
            _write_predictions(paths, affinities, foreground, cfg, attrs)
        # float32 weights from the stored float16 values; the affinities are not needed after that.
        weights = mws_weights(affinities, number_of_attractive_channels(cfg.INFERENCE.OFFSETS))
        del affinities
        datasets = _segment(weights, foreground, cfg, thresholds)
        del weights
        write_hdf(paths["segmentation"], datasets, attrs)
        result = VolumeResult(
            prefix,
            paths["affinities"],
            paths["membranes"],
            paths["segmentation"],
            reused=reused,
            segmentation_keys=list(datasets),
            source=source.url,
            resolution=resolution,
        )
        if evaluate and volume.labels is not None:
            result.scores = _evaluate(datasets, volume.labels)
        results.append(result)
    return results
