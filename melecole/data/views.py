"""Two views of one 3D crop with an exact voxel correspondence, for dense contrastive learning.

A region of ``size + max_shift`` voxels is read from a volume; each view is a ``size`` window of it
at its own random offset (relative crop offset), then a known spatial transform (flips, y/x
transpose, in-plane rot90), then intensity and EM-defect augmentations that never move voxels
(grayscale, noise, missing sections/parts, motion blur, cut-blur from :mod:`melecole.data.augment`).
``num_samples`` voxel locations are drawn in the overlap of the two windows and mapped through
each view's offset and transform, so ``view1[coords1[i]]`` and ``view2[coords2[i]]`` show the same
raw voxel (equal values without intensity augmentation).

Batches (``batch_size=None`` in the DataLoader: the dataset yields whole batches) hold
``view1``/``view2`` ``(B, 1, Z, Y, X)`` float32, ``coords1``/``coords2`` ``(B, N, 3)`` int64 and
``view_groups`` ``(B, N)`` int64: an instance group per sampled voxel (crop index and label id where
labelled, a unique negative number otherwise) for supervised contrast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from yacs.config import CfgNode

from melecole.data.augment import INTENSITY_GROUPS, Compose, build_augmentor
from melecole.data.dataset import worker_init_fn
from melecole.data.volume import Volume, list_volumes, read_volume
from melecole.errors import ConfigError, DataError
from melecole.io import HDF5_SUFFIXES, normalize_raw

__all__ = [
    "SpatialTransform",
    "sample_view_pair",
    "TwoViewDataset",
    "build_view_augmentor",
    "list_unlabeled_volumes",
    "load_view_volumes",
    "build_view_loader",
]


@dataclass(frozen=True)
class SpatialTransform:
    """Flips (z, y, x), then an optional y/x transpose, then ``rotations`` in-plane rot90 (axes y, x).

    Shapes never change: transpose and odd rotations require Y == X.
    """

    flips: tuple = (False, False, False)
    transpose: bool = False
    rotations: int = 0

    @classmethod
    def random(cls, rng: np.random.Generator, shape: Sequence[int]) -> SpatialTransform:
        """One of the 16 in-plane symmetries (8 when Y != X) combined with a random z flip."""
        square = shape[1] == shape[2]
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
        transpose = bool(rng.random() < 0.5) and square
        rotations = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        return cls(flips, transpose, rotations)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Transforms a (Z, Y, X) array (returns a view where possible)."""
        axes = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        if axes:
            array = np.flip(array, axes)
        if self.transpose:
            array = array.transpose(0, 2, 1)
        if self.rotations % 4:
            array = np.rot90(array, self.rotations % 4, axes=(1, 2))
        return array

    def map_coords(self, coords: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """(N, 3) voxel coordinates in an array of ``shape`` -> coordinates after :meth:`apply`."""
        coords = np.array(coords, dtype=np.int64, copy=True)
        shape = list(shape)
        for axis, flip in enumerate(self.flips):
            if flip:
                coords[:, axis] = shape[axis] - 1 - coords[:, axis]
        if self.transpose:
            coords[:, [1, 2]] = coords[:, [2, 1]]
            shape[1], shape[2] = shape[2], shape[1]
        for _ in range(self.rotations % 4):
            # np.rot90 on (y, x) with width W: output[W - 1 - x, y] = input[y, x].
            y, x = coords[:, 1].copy(), coords[:, 2].copy()
            coords[:, 1], coords[:, 2] = shape[2] - 1 - x, y
            shape[1], shape[2] = shape[2], shape[1]
        return coords


def sample_view_pair(
    region: np.ndarray,
    size: Sequence[int],
    num_samples: int,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
    spatial: bool = True,
    augmentor: Compose | None = None,
) -> Dict[str, np.ndarray]:
    """Two augmented ``size`` views of ``region`` and ``num_samples`` corresponding voxels.

    Args:
        region: (Z, Y, X) float32 raw in [0, 1], at least ``size`` on every axis; its excess over
            ``size`` is the range of the relative offset between the views.
        size: (z, y, x) view size.
        num_samples: N voxel locations drawn uniformly in the overlap of the two windows.
        rng: random generator (all randomness comes from it).
        labels: (Z, Y, X) ids aligned with ``region`` (0 = unknown) or None.
        spatial: apply random flips / transpose / rot90 to each view.
        augmentor: intensity / defect augmentations applied to each view independently (must not
            move voxels), or None.

    Returns:
        view1, view2: (Z, Y, X) float32; coords1, coords2: (N, 3) int64; labels: (N,) int64 ids at
        the sampled voxels (0 where unknown); locations: (N, 3) int64 in ``region`` coordinates.
    """
    size = np.asarray(size, dtype=np.int64)
    excess = np.asarray(region.shape, dtype=np.int64) - size
    if (excess < 0).any() or (excess >= size).any():
        raise ValueError(
            f"region {region.shape} must be at least the view size {tuple(size)} and less than twice it"
        )
    offsets = [rng.integers(0, excess + 1) for _ in range(2)]  # window corners in the region
    low = np.maximum(offsets[0], offsets[1])
    high = np.minimum(offsets[0], offsets[1]) + size  # exclusive; never empty since both windows fit
    locations = rng.integers(low, high, size=(num_samples, 3))  # (N, 3) in region coordinates
    result: Dict[str, np.ndarray] = {"locations": locations}
    for index, offset in enumerate(offsets, start=1):
        window = region[tuple(slice(o, o + s) for o, s in zip(offset, size))]
        coords = locations - offset
        if spatial:
            transform = SpatialTransform.random(rng, window.shape)
            coords = transform.map_coords(coords, window.shape)
            window = transform.apply(window)
        window = np.ascontiguousarray(window, dtype=np.float32)
        if augmentor is not None and len(augmentor):
            window, _ = augmentor(window, None, rng)
        result[f"view{index}"] = np.ascontiguousarray(window, dtype=np.float32)
        result[f"coords{index}"] = coords
    if labels is not None:
        result["labels"] = labels[locations[:, 0], locations[:, 1], locations[:, 2]].astype(np.int64)
    else:
        result["labels"] = np.zeros(num_samples, dtype=np.int64)
    return result


def build_view_augmentor(cfg: CfgNode) -> Compose:
    """The enabled intensity / EM-defect groups of AUGMENTATION.* (none that move voxels)."""
    return build_augmentor(cfg, groups=INTENSITY_GROUPS)


class TwoViewDataset(IterableDataset):
    """Endless stream of view-pair batches drawn from in-memory volumes.

    Batch ``b`` (counted from ``start_batch``) is drawn from ``np.random.default_rng([seed, rank, b])``
    whichever DataLoader worker makes it, so a resumed run continues the same stream. Volumes are
    picked in proportion to their voxel count.

    Args:
        volumes: raw (and, if present, labels) to crop from.
        size: (z, y, x) view size. max_shift: (z, y, x) largest relative offset of the views.
        num_samples: N sampled voxels per crop. batch_size: B crops per batch.
        augmentor: per-view intensity / defect augmentations. spatial: flips / transposes / rot90.
        seed, rank: stream identity. start_batch: index of the first batch.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        size: Sequence[int],
        max_shift: Sequence[int],
        num_samples: int,
        batch_size: int,
        augmentor: Compose | None = None,
        spatial: bool = True,
        seed: int = 0,
        rank: int = 0,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if not volumes:
            raise DataError("no volumes to draw contrastive views from")
        self.volumes = list(volumes)
        self.size = tuple(int(s) for s in size)
        for volume in self.volumes:
            if any(r < s for r, s in zip(volume.raw.shape, self.size)):
                raise DataError(
                    f"volume '{volume.path}' (raw shape {tuple(volume.raw.shape)}) is smaller than "
                    f"MODEL.INPUT_SIZE {list(self.size)}"
                )
        # The views must overlap: a shift of at least the view size would leave nothing in common.
        self.max_shift = tuple(min(max(int(m), 0), s - 1) for m, s in zip(max_shift, self.size))
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.augmentor = augmentor
        self.spatial = bool(spatial)
        self.seed, self.rank, self.start_batch = int(seed), int(rank), int(start_batch)
        sizes = np.array([volume.raw.size for volume in self.volumes], dtype=np.float64)
        self.volume_weights = sizes / sizes.sum()

    def crop(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """One view pair from a random region of a random volume."""
        volume = self.volumes[int(rng.choice(len(self.volumes), p=self.volume_weights))]
        region_size = [min(r, s + m) for r, s, m in zip(volume.raw.shape, self.size, self.max_shift)]
        start = [int(rng.integers(0, r - s + 1)) for r, s in zip(volume.raw.shape, region_size)]
        box = tuple(slice(b, b + s) for b, s in zip(start, region_size))
        region = normalize_raw(volume.raw[box], volume.value_range)
        labels = None
        if volume.labels is not None:
            # Label index = raw index - padding; voxels of the padded context have no label (0).
            labels = np.zeros(region_size, dtype=np.int64)
            source, target = [], []
            for b, s, p, n in zip(start, region_size, volume.padding, volume.labels.shape):
                first, last = max(b - p, 0), min(b - p + s, n)
                source.append(slice(first, max(first, last)))
                target.append(slice(first - (b - p), first - (b - p) + max(0, last - first)))
            labels[tuple(target)] = volume.labels[tuple(source)]
        return sample_view_pair(
            region, self.size, self.num_samples, rng, labels, spatial=self.spatial, augmentor=self.augmentor
        )

    def make_batch(self, index: int) -> Dict[str, torch.Tensor]:
        """Batch number ``index`` of the stream (deterministic)."""
        rng = np.random.default_rng([self.seed, self.rank, index])
        pairs = [self.crop(rng) for _ in range(self.batch_size)]
        groups = []
        for crop_index, pair in enumerate(pairs):
            labels = pair["labels"]
            # Labelled voxels: group = (crop, id); unlabelled ones: a unique negative group each.
            unique = -(crop_index * self.num_samples + np.arange(self.num_samples, dtype=np.int64)) - 1
            groups.append(np.where(labels > 0, labels * self.batch_size + crop_index, unique))
        return {
            "view1": torch.from_numpy(np.stack([p["view1"] for p in pairs])[:, None]),
            "view2": torch.from_numpy(np.stack([p["view2"] for p in pairs])[:, None]),
            "coords1": torch.from_numpy(np.stack([p["coords1"] for p in pairs])),
            "coords2": torch.from_numpy(np.stack([p["coords2"] for p in pairs])),
            "view_groups": torch.from_numpy(np.stack(groups)),
        }

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start_batch + worker
        while True:
            yield self.make_batch(index)
            index += workers


def list_unlabeled_volumes(folder: str | os.PathLike) -> list[Path]:
    """Sorted HDF5 files (*.hdf, *.h5, *.hdf5) anywhere below ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"DATASET.UNLABELED_DATA_ROOT: folder '{folder}' does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
    if not files:
        raise DataError(
            f"DATASET.UNLABELED_DATA_ROOT: folder '{folder}' holds no HDF5 volume (*.hdf, *.h5, *.hdf5)"
        )
    return files


def load_view_volumes(cfg: CfgNode) -> list[Volume]:
    """Volumes for contrastive views: DATASET.UNLABELED_DATA_ROOT (raw only) and, when
    MOCO.USE_LABELED_VOLUMES, the labelled DATA_ROOT/TRAIN_SPLIT volumes (raw and labels).

    In pretrain mode a missing labelled folder is not an error; in joint mode it is.
    """
    dataset = cfg.DATASET
    volumes: list[Volume] = []
    if dataset.UNLABELED_DATA_ROOT:
        for path in list_unlabeled_volumes(dataset.UNLABELED_DATA_ROOT):
            volumes.append(read_volume(path, raw_key=dataset.RAW_KEY, label_key=None))
    if cfg.MOCO.USE_LABELED_VOLUMES:
        try:
            paths = list_volumes(dataset.DATA_ROOT, dataset.TRAIN_SPLIT)
        except DataError:
            if cfg.MOCO.MODE != "pretrain" or not volumes:
                raise
            paths = []
        for path in paths:
            volumes.append(read_volume(path, dataset.RAW_KEY, dataset.LABEL_KEY, dataset.PADDING))
    if not volumes:
        raise ConfigError(
            "MOCO: no volumes for contrastive views; set DATASET.UNLABELED_DATA_ROOT "
            "or MOCO.USE_LABELED_VOLUMES True"
        )
    return volumes


def build_view_loader(
    cfg: CfgNode, start_iteration: int = 0, rank: int = 0, volumes: Sequence[Volume] | None = None
) -> DataLoader:
    """DataLoader of view-pair batches (MOCO.BATCH_SIZE crops, or OPTIM.BATCH_SIZE when 0)."""
    if volumes is None:
        volumes = load_view_volumes(cfg)
    batch_size = cfg.MOCO.BATCH_SIZE or cfg.OPTIM.BATCH_SIZE
    dataset = TwoViewDataset(
        volumes,
        size=cfg.MODEL.INPUT_SIZE,
        max_shift=cfg.MOCO.MAX_SHIFT,
        num_samples=cfg.MOCO.NUM_SAMPLES,
        batch_size=batch_size,
        augmentor=build_view_augmentor(cfg),
        spatial=cfg.MOCO.SPATIAL_TRANSFORMS,
        seed=cfg.SYSTEM.SEED + 7919,  # a stream apart from the labelled patches'
        rank=rank,
        start_batch=start_iteration,
    )
    workers = int(cfg.HARDWARE.NUM_WORKERS)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=functools.partial(worker_init_fn, seed=cfg.SYSTEM.SEED + 7919, rank=rank),
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
