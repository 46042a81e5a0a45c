"""Training patches: a map-style dataset whose sample ``index`` fully determines the patch.

Sample ``index`` of process ``rank`` is drawn from ``np.random.default_rng([seed, rank, index])``,
so a resumed run (start_iteration) and any number of loader workers give exactly the same patches,
and every rank draws a different stream. The loader iterates an infinite sequence of indices
starting at ``start_iteration * BATCH_SIZE``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import signal
from typing import Iterator, Sequence

import cc3d
import fastremap
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, Sampler
from yacs.config import CfgNode

from melecole.data.augment import Compose, build_augmentor
from melecole.data.lsd import local_shape_descriptors
from melecole.data.volume import Volume, list_volumes, read_volume
from melecole.errors import DataError
from melecole.io import normalize_raw

__all__ = [
    "TrainDataset",
    "InfiniteIndexSampler",
    "relabel_components",
    "mask_boundaries",
    "crop_padded",
    "read_volumes",
    "worker_init_fn",
    "build_train_loader",
    "build_val_batches",
    "collate_patches",
]

logger = logging.getLogger(__name__)


def _reflect_indices(start: int, size: int, length: int) -> np.ndarray:
    """Indices start .. start + size - 1 mirrored into [0, length) like ``np.pad(mode="reflect")``."""
    indices = np.arange(start, start + size)
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    indices = np.abs(indices) % period
    return np.where(indices >= length, period - indices, indices)


def crop_padded(
    array: np.ndarray, start: Sequence[int], size: Sequence[int], mode: str = "constant"
) -> np.ndarray:
    """The box [start, start + size) of ``array`` (Z, Y, X); parts outside the array are filled.

    Args:
        start: may be negative or reach past the end.
        mode: "constant" fills with 0, "reflect" mirrors the whole array (as ``np.pad``).

    Returns:
        A new array of shape ``size`` (never a view of ``array``).
    """
    low = [min(max(0, s), dim) for s, dim in zip(start, array.shape)]
    high = [max(min(dim, s + n), lo) for s, n, dim, lo in zip(start, size, array.shape, low)]
    inside = array[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    pad = [(lo - s, s + n - hi) for s, n, lo, hi in zip(start, size, low, high)]
    if not any(before or after for before, after in pad):
        return inside.copy()
    if mode == "reflect" and array.size > 0:
        return array[np.ix_(*(_reflect_indices(s, n, dim) for s, n, dim in zip(start, size, array.shape)))]
    return np.pad(inside, pad, mode="constant")


def relabel_components(labels: np.ndarray, min_object_size: int = 0) -> np.ndarray:
    """(Z, Y, X) ids -> int64 6-connected components numbered 1..N; 0 stays 0.

    Voxels of different ids never join; an id split into pieces becomes several objects.
    Components smaller than ``min_object_size`` voxels are set to 0.
    """
    components = cc3d.connected_components(np.ascontiguousarray(labels), connectivity=6)
    if min_object_size > 1:
        sizes = np.bincount(components.ravel())
        small = sizes < min_object_size
        small[0] = False
        if small.any():
            components[small[components]] = 0
            components, _ = fastremap.renumber(components, preserve_zero=True, in_place=True)
    return components.astype(np.int64, copy=False)


def mask_boundaries(labels: np.ndarray, width: int, background_width: int = 0) -> np.ndarray:
    """(Z, Y, X) ids with every voxel within ``width`` voxels of a different non-zero id set to 0.

    A voxel is on a boundary when one of its 6 neighbours carries another non-zero id (both sides of
    an interface are marked, so touching objects end up 2 * ``width`` voxels apart); existing 0
    voxels do not grow. ``width`` 0 returns ``labels`` unchanged. For dense ground truth without a
    boundary class (medulla, SNEMI3D): the foreground head then learns boundaries and the metric loss
    ignores the ambiguous voxels on them.

    ``background_width`` > 0 also grows the 0 voxels themselves by that many voxels (6-connected
    steps) into the objects: for ground truth whose boundary class is thinner than the model can place
    (fib-gala's is one voxel), the foreground head then learns a thicker, closed wall. With both 0 the
    input is returned as is; otherwise a new array.
    """
    if width <= 0 and background_width <= 0:
        return labels
    boundary = np.zeros(labels.shape, dtype=bool)
    if width > 0:
        for axis in range(labels.ndim):
            first = tuple(slice(None, -1) if a == axis else slice(None) for a in range(labels.ndim))
            second = tuple(slice(1, None) if a == axis else slice(None) for a in range(labels.ndim))
            differ = (labels[first] != labels[second]) & (labels[first] != 0) & (labels[second] != 0)
            boundary[first] |= differ
            boundary[second] |= differ
        if width > 1:
            boundary = ndimage.binary_dilation(boundary, iterations=width - 1) & (labels != 0)
    if background_width > 0:
        boundary |= ndimage.binary_dilation(labels == 0, iterations=background_width)
    masked = labels.copy()
    masked[boundary] = 0
    return masked


class TrainDataset(Dataset):
    """Random patches from in-memory volumes, deterministic in (seed, rank, index).

    Each sample picks a volume (probability proportional to its labelled volume) and a box of
    ``patch_size`` in label coordinates (raw index = label index + volume padding). A box whose
    fraction of labels != 0 is below ``min_labeled_fraction`` is redrawn, at most ``max_redraws``
    times (then the last draw is kept). A volume smaller than the patch along an axis is placed at
    a random offset inside it: raw is reflected, labels are 0 outside. The patch is augmented
    (context of ``augmentor.margin`` is read around it and cropped after the spatial
    augmentations), then labels are recomputed into connected components (see
    :func:`relabel_components`).

    Returns per index ``{"raw": float32 (1, Z, Y, X) in [0, 1], "labels": int64 (Z, Y, X)}``, or only
    ``raw`` for unlabelled volumes; with ``lsd_radius`` also ``"lsd"``, float32 (10, Z, Y, X), the
    local shape descriptors of the final labels (:func:`melecole.data.lsd.local_shape_descriptors`).
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_size: Sequence[int],
        augmentor: Compose | None = None,
        seed: int = 0,
        rank: int = 0,
        min_labeled_fraction: float = 0.0,
        max_redraws: int = 20,
        min_object_size: int = 0,
        length: int = 2**62,
        boundary_width: int = 0,
        lsd_radius: Sequence[int] | None = None,
        background_width: int = 0,
    ) -> None:
        if not volumes:
            raise DataError("no volumes given to the training dataset")
        with_labels = [v.labels is not None for v in volumes]
        if any(with_labels) and not all(with_labels):
            missing = [str(v.path) for v in volumes if v.labels is None]
            raise DataError(f"some volumes have labels and some do not (without: {', '.join(missing)})")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive integers (z, y, x), got {list(patch_size)}")
        self.volumes = list(volumes)
        self.labeled = all(with_labels)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.augmentor = augmentor if augmentor is not None and len(augmentor) else None
        self.seed = int(seed)
        self.rank = int(rank)
        self.min_labeled_fraction = float(min_labeled_fraction)
        self.max_redraws = int(max_redraws)
        self.min_object_size = int(min_object_size)
        self.length = int(length)
        self.boundary_width = int(boundary_width)
        self.background_width = int(background_width)
        self.lsd_radius = tuple(int(r) for r in lsd_radius) if lsd_radius else None
        sizes = np.array([v.num_voxels for v in self.volumes], dtype=np.float64)
        if sizes.sum() <= 0:
            raise DataError("all training volumes are empty")
        self.weights = sizes / sizes.sum()

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        """The generator that decides sample ``index``."""
        return np.random.default_rng([self.seed, self.rank, int(index)])

    def _draw_box(self, rng: np.random.Generator) -> tuple[Volume, tuple[int, ...]]:
        volume = self.volumes[int(rng.choice(len(self.volumes), p=self.weights))]
        start = tuple(
            int(rng.integers(min(0, dim - size), max(0, dim - size) + 1))
            for dim, size in zip(volume.shape, self.patch_size)
        )
        return volume, start

    def _labeled_fraction(self, volume: Volume, start: Sequence[int]) -> float:
        labels = crop_padded(volume.labels, start, self.patch_size)
        return np.count_nonzero(labels) / labels.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        volume, start = self._draw_box(rng)
        if self.labeled and self.min_labeled_fraction > 0:
            for _ in range(self.max_redraws):
                if self._labeled_fraction(volume, start) >= self.min_labeled_fraction:
                    break
                volume, start = self._draw_box(rng)

        margin = self.augmentor.margin if self.augmentor is not None else (0, 0, 0)
        region_start = [s - m for s, m in zip(start, margin)]
        region_size = [n + 2 * m for n, m in zip(self.patch_size, margin)]
        raw_start = [s + p for s, p in zip(region_start, volume.padding)]
        raw = crop_padded(volume.raw, raw_start, region_size, mode="reflect")
        raw = normalize_raw(raw, volume.value_range)
        labels = crop_padded(volume.labels, region_start, region_size) if self.labeled else None

        if self.augmentor is not None:
            raw, labels = self.augmentor(raw, labels, rng, crop_size=self.patch_size)

        sample = {"raw": torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None]}
        if labels is not None:
            labels = mask_boundaries(labels, self.boundary_width, self.background_width)
            sample["labels"] = torch.from_numpy(relabel_components(labels, self.min_object_size))
            if self.lsd_radius is not None:
                descriptors = local_shape_descriptors(sample["labels"].numpy(), self.lsd_radius)
                sample["lsd"] = torch.from_numpy(descriptors)
        return sample


class InfiniteIndexSampler(Sampler):
    """Yields start, start + 1, start + 2, ... forever (one index per sample)."""

    def __init__(self, start: int = 0) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def worker_init_fn(worker_id: int, seed: int = 0, rank: int = 0) -> None:
    """Seeds numpy, torch and ``random`` distinctly per (seed, rank, worker), uses one thread and
    ignores SIGTERM and SIGINT.

    Patches do not depend on these generators (see :class:`TrainDataset`); this only keeps any
    other randomness in a worker reproducible and different between workers. A stop signal sent to
    the whole process group (Ctrl-C, Slurm's scancel, ``kill -- -PGID``) is the training process's
    to handle: it finishes the step, saves last.pt and shuts the workers down; a worker killed by
    it first would end the run with a traceback instead. A worker whose parent died still exits
    (PyTorch's worker watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(2)
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    torch.set_num_threads(1)


def read_volumes(
    cfg: CfgNode, split: str, data_root: str | None = None, labeled: bool = True
) -> list[Volume]:
    """All volumes of ``<data_root or DATASET.DATA_ROOT>/<split>``, read with the DATASET.* keys."""
    files = list_volumes(data_root or cfg.DATASET.DATA_ROOT, split)
    label_key = cfg.DATASET.LABEL_KEY if labeled else None
    return [read_volume(f, cfg.DATASET.RAW_KEY, label_key, cfg.DATASET.PADDING) for f in files]


def _pin_memory(cfg: CfgNode) -> bool:
    from melecole.utils.device import resolve_device

    return resolve_device(cfg.HARDWARE.DEVICE).type == "cuda"


def build_train_loader(
    cfg: CfgNode,
    start_iteration: int = 0,
    rank: int = 0,
    world_size: int = 1,
    split: str | None = None,
    data_root: str | None = None,
    labeled: bool = True,
) -> DataLoader:
    """Infinite loader of augmented training batches {"raw": (B, 1, Z, Y, X), "labels": (B, Z, Y, X)}.

    Batch k yields samples (start_iteration + k) * B ... (start_iteration + k + 1) * B - 1 of this
    rank's stream (B = OPTIM.BATCH_SIZE), so resuming at an iteration continues the exact sequence.
    Ranks draw different patches through the (SYSTEM.SEED, rank, index) seed; ``world_size`` only
    checks ``rank``. ``labeled=False`` reads raw only (for MoCo; batches have only "raw");
    ``data_root`` defaults to DATASET.DATA_ROOT, ``split`` to DATASET.TRAIN_SPLIT.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    volumes = read_volumes(cfg, split or cfg.DATASET.TRAIN_SPLIT, data_root, labeled)
    dataset = TrainDataset(
        volumes,
        cfg.MODEL.INPUT_SIZE,
        augmentor=build_augmentor(cfg),
        seed=cfg.SYSTEM.SEED,
        rank=rank,
        min_labeled_fraction=cfg.DATASET.MIN_LABELED_FRACTION,
        max_redraws=cfg.DATASET.MAX_REDRAWS,
        min_object_size=cfg.DATASET.MIN_OBJECT_SIZE,
        boundary_width=cfg.DATASET.BOUNDARY_WIDTH,
        background_width=cfg.DATASET.BACKGROUND_WIDTH,
        lsd_radius=cfg.LOSS.LSD_RADIUS if cfg.LOSS.LSD_WEIGHT > 0 and labeled else None,
    )
    batch_size = cfg.OPTIM.BATCH_SIZE
    num_workers = cfg.HARDWARE.NUM_WORKERS
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteIndexSampler(start_iteration * batch_size),
        num_workers=num_workers,
        worker_init_fn=functools.partial(worker_init_fn, seed=cfg.SYSTEM.SEED, rank=rank),
        persistent_workers=num_workers > 0,
        pin_memory=_pin_memory(cfg),
    )


def collate_patches(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks samples key by key: raw (B, 1, Z, Y, X), labels (B, Z, Y, X)."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def build_val_batches(cfg: CfgNode, rank: int = 0) -> list[dict[str, torch.Tensor]]:
    """LOG.VAL_PATCHES fixed, unaugmented patches of DATASET.VAL_SPLIT in batches of OPTIM.BATCH_SIZE.

    The patches depend only on SYSTEM.SEED and the data (the same on every rank). Returns [] (with a
    warning on rank 0) when the val folder is missing or empty, or when LOG.VAL_PATCHES is 0.
    """
    count = cfg.LOG.VAL_PATCHES
    if count <= 0:
        return []
    try:
        files = list_volumes(cfg.DATASET.DATA_ROOT, cfg.DATASET.VAL_SPLIT)
    except DataError as error:  # no val folder means no validation; a broken file stays an error
        if rank == 0:
            logger.warning("no validation patches: %s", error)
        return []
    volumes = [read_volume(f, cfg.DATASET.RAW_KEY, cfg.DATASET.LABEL_KEY, cfg.DATASET.PADDING) for f in files]
    dataset = TrainDataset(
        volumes,
        cfg.MODEL.INPUT_SIZE,
        augmentor=None,
        seed=cfg.SYSTEM.SEED,
        rank=0,
        min_labeled_fraction=cfg.DATASET.MIN_LABELED_FRACTION,
        max_redraws=cfg.DATASET.MAX_REDRAWS,
        min_object_size=cfg.DATASET.MIN_OBJECT_SIZE,
        boundary_width=cfg.DATASET.BOUNDARY_WIDTH,
        background_width=cfg.DATASET.BACKGROUND_WIDTH,
    )
    samples = [dataset[index] for index in range(count)]
    batch_size = cfg.OPTIM.BATCH_SIZE
    return [collate_patches(samples[i : i + batch_size]) for i in range(0, count, batch_size)]
