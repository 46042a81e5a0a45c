"""Making a zoo entry from a trained run: reduce the checkpoint, score it on validation data, write the manifest.

``melecole-zoo add --run RUN --name NAME --data fib-gala`` calls :func:`make_zoo_entry`. The entry is
assembled in a temporary folder beside its final place and renamed into place only when complete
(weights, ``config.yaml``, ``manifest.yaml``); an existing entry is replaced only with ``overwrite`` and
only if it is a zoo entry (a folder holding just those files and a manifest of :mod:`melecole.zoo`'s
format). The validation VI / ARAND recorded in the manifest are measured here, on the reduced weights, with
the model's stored config: exactly what ``melecole-infer --config CONFIG --checkpoint zoo:NAME --split val``
computes (``tests/test_zoo.py`` re-measures them).
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

import melecole
from melecole.engine.checkpoint import CHECKPOINT_FORMAT, checkpoint_cfg, load_checkpoint
from melecole.errors import ConfigError, DataError
from melecole.utils.files import atomic_path, atomic_torch_save
from melecole.zoo import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MODELS_DIR,
    WEIGHTS_NAME,
    file_sha256,
    read_manifest,
)

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "make_zoo_entry", "reduce_checkpoint", "score_checkpoint"]

logger = logging.getLogger(__name__)
CONFIG_NAME = "config.yaml"
ENTRY_FILES = {MANIFEST_NAME, WEIGHTS_NAME, CONFIG_NAME}


@dataclass(frozen=True)
class DatasetInfo:
    """What a manifest says about the training data (from the data's README)."""

    name: str
    source: str
    licence: str
    voxel_size_nm: tuple[float, float, float]
    files: dict[str, str]
    note: str = ""


# The shared real-EM volumes of ../shared/data (their README.md); --data NAME picks one, other data give
# the same fields on the command line.
DATASETS = {
    "fib-gala": DatasetInfo(
        "fib-gala",
        "janelia-flyem/gala example data: FIB-SEM crops of fruit-fly neuropil with dense neuron ground truth",
        "HHMI/Janelia BSD-style licence (janelia-flyem/gala)",
        (10.0, 10.0, 10.0),
        {"train": "fib-gala/train/gala_train.hdf", "val": "fib-gala/val/gala_test.hdf"},
        "voxel size not stated by the source; the voxels look isotropic, about 10 nm",
    ),
    "medulla": DatasetInfo(
        "medulla",
        "janelia-flyem/neuroproof_examples training_sample2: FIB-SEM of the fruit-fly medulla, split along z",
        "CC-BY (cite the NeuroProof examples / Janelia FlyEM)",
        (10.0, 10.0, 10.0),
        {"train": "medulla/train/medulla_train.hdf", "val": "medulla/val/medulla_val.hdf"},
        "train z < 100, val 100 <= z < 125 of a 250^3 cube; every voxel labelled (no boundary class)",
    ),
}


def reduce_checkpoint(checkpoint: dict) -> dict:
    """The part of a checkpoint that loading and inference need: float32 weights, config, iteration.

    Optimizer, scheduler, scaler and RNG states are dropped (they only serve ``--resume``); parameter
    names lose a ``module.`` prefix of a wrapped model.
    """
    state = {
        key.removeprefix("module."): value.detach().to("cpu", torch.float32 if value.is_floating_point() else None)
        .contiguous().clone()
        for key, value in checkpoint["model"].items()
    }
    return {
        "format": CHECKPOINT_FORMAT,
        "version": checkpoint.get("version", melecole.__version__),
        "iteration": int(checkpoint.get("iteration", 0)),
        "config": checkpoint["config"],
        "model": state,
        "optimizer": None,
        "scheduler": None,
        "scaler": None,
        "rng": None,
    }


def score_checkpoint(weights: str | os.PathLike, data_root: str | os.PathLike, split: str = "val") -> dict[str, Any]:
    """VI split / merge / total (bits) and ARAND of the checkpoint's default segmentation on ``split``.

    Inference runs with the checkpoint's stored config (DATASET.DATA_ROOT set to ``data_root``) into a
    temporary folder that is removed afterwards. Several volumes: the mean of each score.
    """
    from melecole.config import apply_overrides
    from melecole.inference.outputs import segmentation_key
    from melecole.inference.pipeline import run_inference

    cfg = apply_overrides(checkpoint_cfg(load_checkpoint(weights)), ["DATASET.DATA_ROOT", str(data_root),
                                                                      "LOG.PROGRESS_BAR", "false"])
    with tempfile.TemporaryDirectory(prefix="melecole-zoo-") as folder:
        results = run_inference(cfg, weights, split=split, output_dir=folder, progress=False)
    scores = [result.scores[segmentation_key(None)] for result in results if result.scores]
    if not scores:
        raise DataError(f"{data_root}/{split}: no labelled volume to score the model on")
    mean = {key: sum(score[key] for score in scores) / len(scores) for key in ("vi_split", "vi_merge", "arand")}
    return {
        "split": split,
        "volumes": [result.name for result in results if result.scores],
        "vi_split": round(mean["vi_split"], 4),
        "vi_merge": round(mean["vi_merge"], 4),
        "vi": round(mean["vi_split"] + mean["vi_merge"], 4),
        "arand": round(mean["arand"], 4),
    }


def _check_destination(folder: Path, overwrite: bool) -> None:
    """An existing entry is replaced only with ``overwrite`` and only if it holds nothing but a zoo entry."""
    if not os.path.lexists(folder):
        return
    expected = "expected a new zoo name, or --overwrite of an existing zoo entry (nothing was touched)"
    if not overwrite:
        raise DataError(f"zoo entry '{folder}' exists, {expected}")
    if folder.is_symlink() or not folder.is_dir():
        raise DataError(f"zoo entry '{folder}' is not a folder, {expected}")
    foreign = sorted(set(os.listdir(folder)) - ENTRY_FILES)
    if foreign or not (folder / MANIFEST_NAME).is_file():
        raise DataError(f"zoo entry '{folder}' holds {', '.join(foreign) or 'no manifest'}, {expected}")
    read_manifest(folder / MANIFEST_NAME)  # a DataError unless it is one of ours


def _manifest(name: str, description: str, data: DatasetInfo, training: dict, weights: Path,
              reduced: dict, evaluation: dict) -> dict[str, Any]:
    parameters = sum(int(value.numel()) for value in reduced["model"].values())
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "description": description,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "melecole_version": melecole.__version__,
        "weights": {
            "file": WEIGHTS_NAME, "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
            "dtype": "float32", "parameters": parameters, "iteration": reduced["iteration"],
        },
        "data": {
            "name": data.name, "source": data.source, "licence": data.licence,
            "voxel_size_nm": [float(v) for v in data.voxel_size_nm], "files": dict(data.files), "note": data.note,
        },
        "training": training,
        "evaluation": evaluation,
    }


def make_zoo_entry(
    run: str | os.PathLike,
    name: str,
    data: DatasetInfo,
    data_root: str | os.PathLike,
    *,
    config: str,
    command: str,
    description: str,
    split: str = "val",
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``<root>/<name>/`` (weights, config.yaml, manifest.yaml) from a run folder or checkpoint.

    Args:
        run: run folder (its checkpoints/last.pt) or checkpoint file.
        name: the zoo name (letters, digits, ``-``, ``_``, ``.``).
        data: what the manifest says about the training data.
        data_root: folder holding ``<split>/*.hdf`` to score on.
        config, command: the config file and command line that trained the model (recorded).
        description: one line for the manifest.
        split: the split scored (val).
        root: zoo folder (default: the package's ``melecole/zoo/models``).
        overwrite: replace an existing entry of this name (only a zoo entry).

    Returns:
        The entry's folder.
    """
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise ConfigError(f"--name {name!r}: expected letters, digits, '-', '_' or '.' (not first)")
    folder = Path(root if root is not None else MODELS_DIR) / name
    _check_destination(folder, overwrite)
    checkpoint = load_checkpoint(run)
    reduced = reduce_checkpoint(checkpoint)
    reduced["config"] = _with_shipped_inference(checkpoint, config)
    training = {
        "config": config, "command": command, "run": Path(checkpoint["path"]).parent.parent.name,
        "checkpoint": Path(checkpoint["path"]).name, "iteration": reduced["iteration"],
        "trained_with_melecole": reduced["version"],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, folder=True) as temporary:
        temporary.mkdir()
        weights = temporary / WEIGHTS_NAME
        atomic_torch_save(reduced, weights)
        (temporary / CONFIG_NAME).write_text(reduced["config"])
        evaluation = score_checkpoint(weights, data_root, split)
        evaluation["command"] = (
            f"melecole-infer --config {config} --checkpoint zoo:{name} --split {split} --output-dir OUT"
        )
        manifest = _manifest(name, description, data, training, weights, reduced, evaluation)
        (temporary / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False))
    logger.info("zoo entry %s: VI %.4f ARAND %.4f", folder, evaluation["vi"], evaluation["arand"])
    return folder


def _with_shipped_inference(checkpoint: dict, config: str) -> str:
    """The checkpoint's stored config with the INFERENCE group of ``config`` (the recipe as shipped now):
    a zoo model runs with the recipe's current inference settings, not those of the day it trained."""
    from melecole.config import load_cfg

    stored = checkpoint_cfg(checkpoint)
    if not Path(config).is_file():
        logger.warning("zoo entry: config %s not found here; keeping the checkpoint's INFERENCE settings", config)
        return checkpoint["config"]
    shipped = load_cfg(config)
    stored.defrost()
    stored.INFERENCE = shipped.INFERENCE.clone()
    return stored.dump()


def dataset_info(name: str, *, source: str | None = None, licence: str | None = None,
                 voxel_size: Sequence[float] | None = None) -> DatasetInfo:
    """A known dataset's info (:data:`DATASETS`) or one built from the given fields (all required then)."""
    if name in DATASETS:
        known = DATASETS[name]
        return DatasetInfo(known.name, source or known.source, licence or known.licence,
                           tuple(voxel_size or known.voxel_size_nm), known.files, known.note)
    if not (source and licence and voxel_size):
        raise ConfigError(
            f"--data {name!r} is not one of {', '.join(DATASETS)}: give --source, --licence and --voxel-size too"
        )
    return DatasetInfo(name, source, licence, tuple(float(v) for v in voxel_size), {})

