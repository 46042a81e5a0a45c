"""Tiny data for tests: a labelled HDF5 volume of boxes and the overrides of a 6-iteration CPU run.

Test modules import these directly (``from tiny_data import ...``; pytest puts tests/ on sys.path);
``conftest.py`` also offers them as fixtures (``box_volume``, ``tiny_train_opts``).
"""

from __future__ import annotations

from pathlib import Path


def write_box_volume(
    path: Path,
    shape: tuple[int, int, int] = (12, 40, 40),
    seed: int = 0,
    *,
    labels: bool = True,
    raw_shape: tuple[int, int, int] | None = None,
) -> Path:
    """Writes a tiny HDF5 volume of the dataset layout: boxes of distinct ids (6 sections deep, 7 x 7
    voxels) separated by 1-voxel boundaries (label 0); the raw is bright inside boxes, dark on the
    boundaries, plus noise. ``raw_shape`` replaces the raw by noise of another shape (shape errors);
    ``labels=False`` writes raw only (unlabelled data)."""
    import h5py
    import numpy as np

    from melecole.data.synthetic import box_volume

    raw, ids = box_volume(shape, seed)
    if raw_shape is not None:
        # the generator's RNG continues after the box raw's noise, as it always did
        rng = np.random.default_rng(seed)
        rng.integers(0, 30, shape, dtype=np.uint8)
        raw = rng.integers(0, 255, raw_shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
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
    for split, seed in (("train", 0), ("val", 1)):
        write_box_volume(tmp_path / "data" / split / f"{split}.hdf", seed=seed)
    opts = {"DATASET.DATA_ROOT": str(tmp_path / "data"), "LOG.OUTPUT_PATH": str(tmp_path / "runs"), **TINY_TRAIN_OPTS}
    opts.update(extra)
    return [item for pair in opts.items() for item in pair]
