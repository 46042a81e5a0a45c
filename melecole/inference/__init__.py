"""Inference: sliding-window prediction -> blended affinities + foreground -> segmentation -> files.

    affinities, foreground = predict_volume(model, raw, window=(20, 128, 128), offsets=OFFSETS, delta_d=1.5)
    labels = mutex_watershed(affinities, OFFSETS, foreground=foreground, background_threshold=0.5)

``run_inference(cfg, checkpoint, split=...)`` is the library side of ``infer.py``. Modules, lowest
first: options (built once from the config), affinities (torch), tta, sliding_window, outputs (names,
files, fingerprint), inputs, chunked, stores, pipeline. The segmentation algorithms are
:mod:`melecole.segmentation` (numpy only).
"""

from melecole.inference.affinities import (
    INVALID_AFFINITY,
    affinities_from_labels,
    embeddings_to_affinities,
)
from melecole.inference.options import (
    PredictOptions,
    build_predict_options,
    default_stride,
    resolve_windows,
)
from melecole.inference.outputs import VolumeResult, results_dir
from melecole.inference.pipeline import run_inference, segment_affinities
from melecole.inference.sliding_window import blending_profile, predict_volume, window_starts
from melecole.segmentation.mws import mutex_watershed, mws_weights
from melecole.utils.offsets import number_of_attractive_channels, offset_valid_mask

__all__ = [
    "INVALID_AFFINITY",
    "PredictOptions",
    "VolumeResult",
    "affinities_from_labels",
    "blending_profile",
    "build_predict_options",
    "default_stride",
    "embeddings_to_affinities",
    "mutex_watershed",
    "mws_weights",
    "number_of_attractive_channels",
    "offset_valid_mask",
    "predict_volume",
    "resolve_windows",
    "results_dir",
    "run_inference",
    "segment_affinities",
    "window_starts",
]
