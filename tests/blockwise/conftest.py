"""Tiny volumes for the blockwise tests: Voronoi neurons, their affinities with noise, one dask cluster."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from melecole.config import get_default_cfg
from melecole.inference.affinities import affinities_from_labels

SHAPE = (16, 48, 48)


def voronoi_labels(shape=SHAPE, seeds: int = 24, seed: int = 0) -> np.ndarray:
    """(Z, Y, X) uint32 ids: every voxel takes its nearest random seed (anisotropic 1:4), then 6-connected
    components (a discrete Voronoi cell can fall apart) of at least 20 voxels."""
    import cc3d

    rng = np.random.default_rng(seed)
    markers = np.zeros(shape, dtype=np.int32)
    points = rng.integers(0, shape, size=(seeds, 3))
    markers[tuple(points.T)] = np.arange(1, seeds + 1)
    _, index = ndimage.distance_transform_edt(markers == 0, sampling=(4, 1, 1), return_indices=True)
    from melecole.segmentation.postprocess import postprocess_segmentation

    labels = cc3d.connected_components(markers[tuple(index)], connectivity=6)
    # Pieces under 20 voxels join their nearest neighbour: every object has an interior.
    labels = postprocess_segmentation(labels, min_size=20, fill=True)
    return cc3d.connected_components(labels, connectivity=6).astype(np.uint32)


def noisy_affinities(labels: np.ndarray, offsets, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    """Ideal affinities, blurred and with Gaussian noise, clipped to [0, 1] (float32 (C, Z, Y, X))."""
    rng = np.random.default_rng(seed)
    ideal = affinities_from_labels(labels, offsets)
    blurred = ndimage.gaussian_filter(ideal, (0, 0.5, 1.0, 1.0))
    return np.clip(blurred + rng.normal(0, noise, ideal.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def blockwise_cfg():
    cfg = get_default_cfg()
    cfg.BLOCKWISE.OUTPUT_CHUNKS = [8, 16, 16]
    cfg.BLOCKWISE.BLOCK_SHAPE = [8, 16, 16]
    cfg.INFERENCE.MIN_SEGMENT_SIZE = 10
    cfg.LOG.PROGRESS_BAR = False
    return cfg


@pytest.fixture(scope="session")
def tiny_volume(tmp_path_factory, blockwise_cfg) -> dict:
    """An HDF5 file with affinities (C, Z, Y, X), foreground and labels of a 16 x 48 x 48 volume."""
    labels = voronoi_labels()
    affinities = noisy_affinities(labels, blockwise_cfg.INFERENCE.OFFSETS)
    path = Path(tmp_path_factory.mktemp("blockwise")) / "tiny.hdf"
    with h5py.File(path, "w") as handle:
        handle["affinities"] = affinities
        handle["foreground"] = np.ones(labels.shape, dtype=np.float32)
        handle["labels"] = labels
        handle["short"] = np.ones((4, 8, 8), dtype=np.float32)
    return {"path": path, "labels": labels, "affinities": affinities}


@pytest.fixture(scope="session")
def dask_client():
    """A LocalCluster with 2 worker processes (one thread each), shared by the blockwise tests."""
    distributed = pytest.importorskip("distributed")
    import logging

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client:
        yield client
