"""The model zoo: trained models shipped with the package, named ``zoo:NAME`` wherever a checkpoint is taken.

Each model is a folder ``melecole/zoo/models/<NAME>/`` with

- ``weights.pt``: a checkpoint reduced to what loading and inference need (the model's float32 weights,
  the merged config, the iteration; no optimizer, scheduler or RNG state). It loads with
  :func:`melecole.engine.checkpoint.load_checkpoint` like any checkpoint of the library;
- ``manifest.yaml``: where it comes from and how good it is: the data (files, voxel size, source,
  licence), the config and command that trained it, the weights' SHA-256, the validation VI / ARAND and
  the command that measured them (docs/zoo.md).

:func:`resolve` checks the weights' content hash against the manifest before anything reads them, so a
damaged or replaced file is a one-line error instead of a silently different model. Only the standard
library, yaml and the error types are used here: :mod:`melecole.engine.checkpoint` (layer 4) calls this
module, and making an entry (training, scoring) lives above it, in :mod:`melecole.export.zoo_entry`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from melecole.errors import CheckpointError, DataError

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MODELS_DIR",
    "WEIGHTS_NAME",
    "ZOO_PREFIX",
    "ZooModel",
    "file_sha256",
    "get_model",
    "is_zoo_name",
    "list_models",
    "read_manifest",
    "resolve",
    "verify_weights",
]

ZOO_PREFIX = "zoo:"
MODELS_DIR = Path(__file__).resolve().parent / "models"
MANIFEST_NAME = "manifest.yaml"
WEIGHTS_NAME = "weights.pt"
MANIFEST_FORMAT = "melecole-zoo-v1"
# Keys every manifest must hold (nested ones as "group.key"); read_manifest names the first missing one.
REQUIRED_KEYS = (
    "format", "name", "description", "weights.file", "weights.sha256", "data.name", "data.licence",
    "data.voxel_size_nm", "training.config", "training.command", "evaluation.split", "evaluation.vi",
    "evaluation.arand",
)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: its folder and parsed manifest."""

    name: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def weights(self) -> Path:
        """The reduced checkpoint file."""
        return self.folder / str(self.manifest["weights"]["file"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["weights"]["sha256"])

    def row(self) -> dict[str, Any]:
        """The columns of ``melecole-zoo list``."""
        data, evaluation = self.manifest["data"], self.manifest["evaluation"]
        return {
            "name": self.name,
            "data": data["name"],
            "voxel nm": "x".join(f"{float(v):g}" for v in data["voxel_size_nm"]),
            f"VI ({evaluation['split']})": f"{float(evaluation['vi']):.3f}",
            "ARAND": f"{float(evaluation['arand']):.3f}",
            "kB": f"{self.weights.stat().st_size / 1024:.0f}" if self.weights.is_file() else "missing",
            "data licence": data["licence"],
            "config": self.manifest["training"]["config"],
        }


def _lookup(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parses and checks one ``manifest.yaml``.

    Raises:
        DataError: unreadable YAML, not a mapping, another format, or a required key missing (named).
    """
    path = Path(path)
    try:
        manifest = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataError(f"zoo manifest '{path}' could not be read ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"zoo manifest '{path}': expected a YAML mapping, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"zoo manifest '{path}': format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    missing = [key for key in REQUIRED_KEYS if _lookup(manifest, key) is None]
    if missing:
        raise DataError(f"zoo manifest '{path}': no '{missing[0]}' entry, expected every key of docs/zoo.md")
    if manifest["name"] != path.parent.name:
        raise DataError(
            f"zoo manifest '{path}': name is {manifest['name']!r}, expected the folder's name {path.parent.name!r}"
        )
    return manifest


def list_models(root: str | os.PathLike | None = None) -> list[ZooModel]:
    """Every zoo entry under ``root`` (default :data:`MODELS_DIR`), sorted by name."""
    root = Path(root) if root is not None else MODELS_DIR
    if not root.is_dir():
        return []
    return [
        ZooModel(folder.name, folder, read_manifest(folder / MANIFEST_NAME))
        for folder in sorted(root.iterdir())
        if (folder / MANIFEST_NAME).is_file()
    ]


def is_zoo_name(text: Any) -> bool:
    """True for ``"zoo:NAME"`` strings."""
    return isinstance(text, str) and text.startswith(ZOO_PREFIX)


def get_model(name: str, root: str | os.PathLike | None = None) -> ZooModel:
    """The entry called ``name`` (with or without the ``zoo:`` prefix).

    Raises:
        CheckpointError: no such entry (the message lists the names there are).
    """
    bare = name[len(ZOO_PREFIX):] if is_zoo_name(name) else name
    models = {model.name: model for model in list_models(root)}
    if bare not in models:
        known = ", ".join(sorted(models)) or "none installed"
        raise CheckpointError(
            f"zoo model '{bare}' does not exist, expected one of: {known} (melecole-zoo list shows them)"
        )
    return models[bare]


def verify_weights(model: ZooModel) -> None:
    """Raises DataError unless the weights file exists and its SHA-256 equals the manifest's."""
    if not model.weights.is_file():
        raise DataError(f"zoo model '{model.name}': weights file '{model.weights}' is missing")
    actual = file_sha256(model.weights)
    if actual != model.sha256:
        raise DataError(
            f"zoo model '{model.name}': weights '{model.weights}' have SHA-256 {actual[:16]}..., expected "
            f"{model.sha256[:16]}... from its manifest (the file was changed or damaged; reinstall the package)"
        )


def resolve(name: str, root: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """``"zoo:NAME"`` -> (path of its verified weights file, its manifest).

    Raises:
        CheckpointError: unknown name.
        DataError: weights missing or not those the manifest describes.
    """
    model = get_model(name, root)
    verify_weights(model)
    return model.weights, model.manifest
