"""Data: HDF5 volumes (volume), EM augmentations (augment), training patches and loaders (dataset)."""

from melecole.data.augment import (
    Augmentation,
    Compose,
    CutBlur,
    Elastic,
    Flip,
    Grayscale,
    Misalignment,
    MissingParts,
    MissingSection,
    MotionBlur,
    Noise,
    Rotate,
    build_augmentor,
)
from melecole.data.dataset import (
    InfiniteIndexSampler,
    TrainDataset,
    build_train_loader,
    build_val_batches,
    relabel_components,
    worker_init_fn,
)
from melecole.data.volume import Volume, check_data_root, list_volumes, normalize_raw, read_volume

__all__ = [
    "Augmentation",
    "Compose",
    "CutBlur",
    "Elastic",
    "Flip",
    "Grayscale",
    "InfiniteIndexSampler",
    "Misalignment",
    "MissingParts",
    "MissingSection",
    "MotionBlur",
    "Noise",
    "Rotate",
    "TrainDataset",
    "Volume",
    "build_augmentor",
    "build_train_loader",
    "build_val_batches",
    "check_data_root",
    "list_volumes",
    "normalize_raw",
    "read_volume",
    "relabel_components",
    "worker_init_fn",
]
