"""Whole-volume inference: checkpoint + volumes -> affinities, foreground, segmentation files.

The run is a plan (options built once from the config, the checkpoint's model and identity, the
volumes to infer) and a loop over volumes: read -> reuse cached predictions or predict -> mutex
watershed per threshold -> post-processing -> HDF5 results (:mod:`melecole.inference.outputs`
names them and holds the fingerprint) -> optional scores against labels.

``<prefix>`` of the output files is the split name, ``<split>_<volume stem>`` when the split holds
several volumes, or the input's name for ``--input`` (:mod:`melecole.inference.inputs`). The run dir
is the checkpoint's run folder (the checkpoint lies in RUN/checkpoints/) or the given output folder.
Outputs cover the labelled region: the raw may carry DATASET.PADDING context, which is used for
prediction and then cropped away.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from melecole.data.volume import Volume
from melecole.errors import ConfigError
from melecole.evaluation import evaluate_segmentation
from melecole.inference.inputs import InputSource, read_input, volume_jobs
from melecole.inference.options import (
    PredictOptions,
    build_predict_options,
    resolve_windows,
)
from melecole.inference.outputs import (
    STORAGE_DTYPE,
    VolumeResult,
    file_sha256,
    fingerprint,
    output_paths,
    read_cached_predictions,
    results_dir,
    segmentation_key,
    write_hdf,
    write_predictions,
)
from melecole.inference.sliding_window import predict_volume
from melecole.io import check_writable_folder, model_input, remove_stale_temporaries
from melecole.segmentation.mws import mws_weights
from melecole.segmentation.options import SegmentationOptions, build_segmentation_options
from melecole.segmentation.volume import segment_volume
from melecole.utils.offsets import number_of_attractive_channels

__all__ = [
    "VolumeResult",
    "predict_stored",
    "resolve_windows",
    "results_dir",
    "run_inference",
    "segment_affinities",
    "segmentation_key",
    "write_hdf",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """Everything a volume's inference needs besides the volume itself."""

    model: torch.nn.Module
    predict: PredictOptions
    segment: SegmentationOptions
    thresholds: tuple[float, ...]
    out_dir: Path
    checkpoint_file: Path
    checkpoint_sha: str
    iteration: int
    label_key: str
    padding: tuple[int, ...]


def predict_stored(
    model: torch.nn.Module, volume: Volume, options: PredictOptions, progress: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Sliding-window prediction on the whole raw, outputs for the labelled region, in the storage
    dtype (float16) the cache and the segmentation use."""
    affinities, foreground = predict_volume(
        model,
        model_input(volume.raw, volume.value_range),
        progress=progress,
        region=volume.label_region,
        **options.predict_kwargs(),
    )
    stored = np.empty(affinities.shape, dtype=STORAGE_DTYPE)
    for channel in range(affinities.shape[0]):  # channel-wise: no second float32-sized temporary
        stored[channel] = affinities[channel]
    del affinities
    return stored, foreground.astype(STORAGE_DTYPE)


def segment_affinities(
    affinities: np.ndarray,
    foreground: np.ndarray,
    options: SegmentationOptions,
    thresholds: Sequence[float] = (),
    *,
    weights_ready: bool = False,
) -> dict[str, tuple[np.ndarray, dict]]:
    """Mutex watershed at ``options.background`` and at each extra threshold, each post-processed.

    The float32 edge weights are computed once (:func:`mws_weights`) and shared by all thresholds;
    ``weights_ready`` says ``affinities`` already are those weights (the caller freed the affinities).

    Returns:
        {dataset key (:func:`segmentation_key`): (uint64 labels (Z, Y, X), dataset attributes)}.
    """
    weights = affinities if weights_ready else mws_weights(affinities, number_of_attractive_channels(options.offsets))
    wanted: dict[str, float] = {segmentation_key(None): options.background}
    wanted.update({segmentation_key(t): float(t) for t in thresholds})
    done: dict[float, np.ndarray] = {}
    datasets = {}
    for key, threshold in wanted.items():
        if threshold not in done:
            done[threshold] = segment_volume(weights, foreground, options, threshold)
        attrs = {**options.attrs(threshold), "num_segments": int(done[threshold].max())}
        datasets[key] = (done[threshold], attrs)
    return datasets


def _scores(datasets: dict[str, tuple[np.ndarray, dict]], labels: np.ndarray) -> dict[str, dict[str, float]]:
    """VI split/merge (bits) and adapted Rand error per segmentation."""
    scores = {}
    for key, (segmentation, _) in datasets.items():
        result = evaluate_segmentation(segmentation, labels, top_k=0)
        scores[key] = {"vi_split": result.vi_split, "vi_merge": result.vi_merge, "arand": result.arand}
    return scores


def _infer_volume(
    plan: _Plan, prefix: str, source: InputSource, *, overwrite: bool, evaluate: bool, progress: Any
) -> VolumeResult:
    """One volume: cached or fresh predictions, segmentations, result files, scores."""
    volume, identity, resolution = read_input(source, plan.label_key, plan.padding)
    predict = plan.predict.plan_for(volume.raw.shape)  # the window plan of this volume's shape
    logger.info("%s: window %s, stride %s, batch %s, backend %s", source.url,
                list(predict.window), list(predict.stride), predict.batch_size, predict.backend)
    paths = output_paths(plan.out_dir, prefix)
    key = fingerprint(predict, plan.checkpoint_sha, plan.iteration, identity, volume.label_region)
    attrs = {"fingerprint": key, "checkpoint": str(plan.checkpoint_file), "input": source.url}
    cached = None if overwrite else read_cached_predictions(paths, key)
    reused = cached is not None
    if cached is not None:
        logger.info("%s: reusing cached affinities and foreground from %s", source.url, plan.out_dir)
        affinities, foreground = cached
        del cached
    else:
        logger.info("%s: predicting raw %s -> output %s", source.url, volume.raw.shape, volume.shape)
        affinities, foreground = predict_stored(plan.model, volume, predict, progress)
        write_predictions(paths, affinities, foreground, predict.offsets, attrs)
    # float32 weights from the stored float16 values; the affinities are not needed after that.
    weights = mws_weights(affinities, number_of_attractive_channels(plan.segment.offsets))
    del affinities
    datasets = segment_affinities(weights, foreground, plan.segment, plan.thresholds, weights_ready=True)
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
        if volume.labels.any():
            result.scores = _scores(datasets, volume.labels)
        else:
            logger.warning(
                "%s: labels '%s' are all 0 (no labelled voxel): outputs written, nothing to evaluate",
                source.url,
                plan.label_key,
            )
    return result


def _prepare_results_folder(out_dir: Path, output_dir: str | os.PathLike | None) -> None:
    """Checks that the results folder can be written (before any prediction) and removes the stale
    temporary files that killed writes of MeLeCoLe left there."""
    what = f"--output-dir '{output_dir}'" if output_dir is not None else f"results folder '{out_dir}'"
    check_writable_folder(out_dir, what)
    for path in remove_stale_temporaries(out_dir):
        logger.info("removed %s (left by an interrupted write)", path)


def run_inference(
    cfg: Any,
    checkpoint_path: str | os.PathLike,
    *,
    split: str | None = None,
    input_path: str | os.PathLike | None = None,
    raw_key: str | None = None,
    output_dir: str | os.PathLike | None = None,
    thresholds: Sequence[float] = (),
    overwrite: bool = False,
    evaluate: bool = True,
    progress: Any = True,
) -> list[VolumeResult]:
    """Predicts, caches and segments every volume of ``split`` (or the one ``input_path``).

    Args:
        cfg: merged config; its model-shaping keys must match the checkpoint's.
        checkpoint_path: a checkpoint file, or a run folder (uses checkpoints/last.pt).
        split: infer every HDF5 volume in ``<DATASET.DATA_ROOT>/<split>/``.
        input_path: one volume instead of the split's: an HDF5 file (``file.hdf``, ``file.hdf:key``),
            zarr (``x.zarr[:key]``) or precomputed URL (``precomputed://file:///abs``, ``gs://...``);
            ``split``, if given, only names the outputs. ``raw_key`` overrides DATASET.RAW_KEY.
        output_dir: run folder for results/ (default: the checkpoint's run folder; for ``zoo:NAME``,
            ``outputs/zoo/NAME`` under the current folder).
        thresholds: extra foreground thresholds; each adds a 'segmentation_tX.XX' dataset.
        overwrite: recompute affinities even if matching cached files exist.
        evaluate: score segmentations against labels when the file has them.
        progress: progress bar over windows (a bool or a LOG.PROGRESS_BAR setting).

    Raises:
        CheckpointError: missing / unreadable checkpoint, or one trained with a different model shape.
        DataError: missing split folder, input or HDF5 key / zarr array; raw with NaN / Inf or
            empty; an unwritable results folder (checked before predicting) or a failed write.
        ConfigError: unusable window / stride / margin.
    """
    from melecole.engine.checkpoint import build_model_from_checkpoint

    for threshold in thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--thresholds must lie in [0, 1], got {threshold}")
    predict = build_predict_options(cfg)
    jobs = volume_jobs(cfg.DATASET.DATA_ROOT, split, input_path, raw_key or cfg.DATASET.RAW_KEY)
    predict.configure_threads()
    model, _, checkpoint = build_model_from_checkpoint(checkpoint_path, cfg, device=predict.torch_device)
    checkpoint_file = Path(checkpoint["path"])
    if output_dir is None and checkpoint.get("zoo"):
        # a zoo model has no run folder (its file lies in the installed package): results go to ./outputs
        output_dir = Path("outputs") / "zoo" / str(checkpoint["zoo"])
    plan = _Plan(
        model=model,
        predict=predict,
        segment=build_segmentation_options(cfg, "volume"),
        thresholds=tuple(float(t) for t in thresholds),
        out_dir=results_dir(checkpoint_file, output_dir),
        checkpoint_file=checkpoint_file,
        checkpoint_sha=file_sha256(checkpoint_file),
        iteration=int(checkpoint.get("iteration", -1)),
        label_key=cfg.DATASET.LABEL_KEY,
        padding=tuple(cfg.DATASET.PADDING),
    )
    logger.info("checkpoint %s (iteration %s) on %s", checkpoint_file, plan.iteration, predict.device)
    _prepare_results_folder(plan.out_dir, output_dir)
    return [
        _infer_volume(plan, prefix, source, overwrite=overwrite, evaluate=evaluate, progress=progress)
        for prefix, source in jobs
    ]
