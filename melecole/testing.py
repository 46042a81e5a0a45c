"""Helpers for tests and benches, not used by the library: nothing in ``melecole`` imports this module.
It imports torch only when the loss reference runs, so benches of data and I/O stay light.

- :func:`reference_metric_loss`: a deliberately plain, loop-based metric loss, the ground truth that
  ``tests/test_losses.py`` and ``bench/bench_loss.py`` compare :class:`melecole.losses.MetricLoss` with.
- :func:`box_volume`, :func:`write_box_volume`: a tiny labelled volume of boxes (in memory, or as an HDF5
  file of the dataset layout), for tests and ``bench/fault_injection.py``.
- :data:`TINY_TRAIN_OPTS`, :func:`make_tiny_train_opts`: a tiny dataset and the config overrides of a
  6-iteration CPU training run (``tests/conftest.py`` offers them as fixtures).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Sequence

import numpy as np

from melecole.io import create_hdf5

if TYPE_CHECKING:
    import torch

__all__ = ["TINY_TRAIN_OPTS", "box_volume", "make_tiny_train_opts", "reference_metric_loss", "write_box_volume"]


# --------------------------------------------------------------------------------------------------
# Loop reference of the metric loss
# --------------------------------------------------------------------------------------------------


def reference_metric_loss(
    embedding: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float,
    delta_d: float,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    norm: str = "l2",
) -> Dict[str, torch.Tensor]:
    """Metric loss terms by explicit loops over patches, objects and object pairs, one at a time,
    exactly as the formulas read in :mod:`melecole.losses.metric`. Slow; never use it for training.

    Args:
        embedding: (B, E, Z, Y, X).
        labels: (B, Z, Y, X), 0 ignored.

    Returns:
        {"pull", "push", "regularizer", "metric"} scalars, averaged over patches with >= 1 object.
    """
    import torch

    from melecole.losses.metric import vector_norm

    pulls, pushes, regularizers = [], [], []
    for b in range(embedding.shape[0]):
        ids = [int(i) for i in torch.unique(labels[b]) if int(i) != 0]
        if not ids:
            continue  # a patch without objects contributes nothing
        means = []
        pull = embedding.new_zeros(())
        for object_id in ids:
            mask = labels[b] == object_id
            vectors = embedding[b][:, mask].T  # (voxels, E)
            mean = vectors.mean(0)
            means.append(mean)
            distances = vector_norm(vectors - mean, norm)
            pull = pull + torch.clamp(distances - delta_v, min=0).pow(2).mean()
        pull = pull / len(ids)
        push = embedding.new_zeros(())
        pairs = 0
        for k in range(len(means)):
            for l in range(len(means)):
                if k == l:
                    continue
                distance = vector_norm(means[k] - means[l], norm)
                push = push + torch.clamp(2 * delta_d - distance, min=0).pow(2)
                pairs += 1
        if pairs:
            push = push / pairs
        regularizer = sum(vector_norm(mean, norm) for mean in means) / len(means)
        pulls.append(pull)
        pushes.append(push)
        regularizers.append(regularizer)
    if not pulls:
        zero = embedding.sum() * 0.0
        return {"pull": zero, "push": zero, "regularizer": zero, "metric": zero}
    pull = torch.stack(pulls).mean()
    push = torch.stack(pushes).mean()
    regularizer = torch.stack(regularizers).mean()
    metric = alpha * pull + beta * push + gamma * regularizer
    return {"pull": pull, "push": push, "regularizer": regularizer, "metric": metric}


# --------------------------------------------------------------------------------------------------
# Tiny data
# --------------------------------------------------------------------------------------------------


def box_volume(shape: Sequence[int] = (12, 40, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny labelled volume: boxes of distinct ids (6 sections deep, 7 x 7 voxels) separated by
    1-voxel boundaries (label 0); the raw is bright inside boxes, dark on the boundaries, plus
    uniform noise.

    Returns:
        raw: uint8 (Z, Y, X); labels: uint32 (Z, Y, X).
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.uint32)
    next_id = 1
    for z in range(0, shape[0], 6):
        for y in range(0, shape[1], 8):
            for x in range(0, shape[2], 8):
                ids[z : z + 6, y + 1 : y + 8, x + 1 : x + 8] = next_id
                next_id += 1
    raw = np.where(ids > 0, 180, 40).astype(np.uint8) + rng.integers(0, 30, shape, dtype=np.uint8)
    return raw, ids


def write_box_volume(
    path: Path,
    shape: tuple[int, int, int] = (12, 40, 40),
    seed: int = 0,
    *,
    labels: bool = True,
    raw_shape: tuple[int, int, int] | None = None,
) -> Path:
    """Writes :func:`box_volume` as an HDF5 file of the dataset layout ("volume", "labels").

    ``raw_shape`` replaces the raw by noise of another shape (shape errors); ``labels=False`` writes
    raw only (unlabelled data).
    """
    raw, ids = box_volume(shape, seed)
    if raw_shape is not None:
        # the generator's RNG continues after the box raw's noise, as it always did
        rng = np.random.default_rng(seed)
        rng.integers(0, 30, shape, dtype=np.uint8)
        raw = rng.integers(0, 255, raw_shape, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with create_hdf5(path) as handle:
        handle["volume"] = raw
        if labels:
            handle["labels"] = ids
    return path


TINY_TRAIN_OPTS = {
    "MODEL.INPUT_SIZE": "[8, 32, 32]",
    "MODEL.FILTERS": "[4, 8]",
    "MODEL.POOL_Z": "[False]",
    "MODEL.NORM_GROUPS": "2",
    "MODEL.EMBEDDING_DIMENSION": "4",
    "OPTIM.TOTAL_ITER": "6",
    "OPTIM.BATCH_SIZE": "2",
    "HARDWARE.NUM_WORKERS": "0",
    "HARDWARE.DEVICE": "cpu",
    "LOG.CHECKPOINT_FREQUENCY": "3",
    "LOG.VAL_FREQUENCY": "3",
    "LOG.VAL_PATCHES": "2",
    "LOG.IMAGE_FREQUENCY": "3",
    "LOG.LOG_FREQUENCY": "1",
    "LOG.PROGRESS_BAR": "False",
    "AUGMENTATION.ELASTIC.P": "0.0",
}


def make_tiny_train_opts(tmp_path: Path, **extra: str) -> list[str]:
    """Writes a tiny train/val dataset under ``tmp_path/data`` and returns KEY VALUE overrides for a
    6-iteration CPU run writing to ``tmp_path/runs``; ``extra`` (KEY_WITH_DOTS=value via a dict
    splat) overrides or adds keys."""
    tmp_path = Path(tmp_path)
    for split, seed in (("train", 0), ("val", 1)):
        write_box_volume(tmp_path / "data" / split / f"{split}.hdf", seed=seed)
    opts = {"DATASET.DATA_ROOT": str(tmp_path / "data"), "LOG.OUTPUT_PATH": str(tmp_path / "runs"), **TINY_TRAIN_OPTS}
    opts.update(extra)
    return [item for pair in opts.items() for item in pair]
