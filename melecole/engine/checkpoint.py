"""Self-describing checkpoints (docs/ARCHITECTURE.md): one dict, written atomically, weights unwrapped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode as CN

import melecole
from melecole.config import MODEL_SHAPING_KEYS, cfg_from_yaml_text
from melecole.errors import CheckpointError, MeLeCoLeError
from melecole.utils.comm import unwrap_model
from melecole.utils.files import atomic_torch_save

__all__ = [
    "CHECKPOINT_FORMAT",
    "HEAD_PREFIXES",
    "build_model_from_checkpoint",
    "check_model_compatible",
    "checkpoint_cfg",
    "load_backbone_weights",
    "load_checkpoint",
    "load_fine_tuning_weights",
    "load_model_weights",
    "model_shape_differences",
    "save_checkpoint",
    "unwrap_model",
    "without_unused_lsd_head",
]

CHECKPOINT_FORMAT = "melecole-checkpoint-v1"
# Parameters that belong to the task heads, not the backbone (not loaded by --ssl_checkpoint).
HEAD_PREFIXES = ("embedding_head.", "foreground_head.", "lsd_head.")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    cfg: CN,
    iteration: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng_state: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Writes the checkpoint dict to ``path`` atomically (temporary file + rename)."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": melecole.__version__,
        "iteration": int(iteration),
        "config": cfg.dump(),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state,
    }
    if extra:
        checkpoint.update(extra)
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by ``save_checkpoint``; clear errors for missing/foreign files.

    ``path`` is a checkpoint file, a run folder (its ``checkpoints/last.pt``) or a zoo name ``zoo:NAME``
    (:mod:`melecole.zoo`: the weights' hash is checked against the manifest first). Every command that
    takes a checkpoint (infer.py, blockwise, --supervised_checkpoint, export) comes through here. The
    returned dict holds ``path`` (the file read) and, for a zoo model, ``zoo`` (its name).
    """
    zoo_name = None
    if isinstance(path, str) and path.startswith("zoo:"):
        from melecole.zoo import resolve

        zoo_name = path[len("zoo:"):]
        path, _ = resolve(zoo_name)
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if not candidate.is_file():
            candidate = path / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"checkpoint folder '{path}' has no checkpoints/last.pt")
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"checkpoint '{path}' is not a MeLeCoLe checkpoint (no 'model' and 'config' entries)")
    iteration = checkpoint.get("iteration", 0)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(
            f"checkpoint '{path}': iteration is {iteration!r} ({type(iteration).__name__}), expected an integer >= 0"
        )
    checkpoint["path"] = str(path)
    if zoo_name is not None:
        checkpoint["zoo"] = zoo_name
    return checkpoint


def checkpoint_cfg(checkpoint: dict) -> CN:
    """The config stored inside a checkpoint."""
    try:
        source = f"config stored in checkpoint '{checkpoint.get('path')}'"
        return cfg_from_yaml_text(checkpoint["config"], source=source)
    except MeLeCoLeError as error:
        raise CheckpointError(str(error)) from None


def model_shape_differences(stored: CN, current: CN) -> list[str]:
    """'KEY: stored -> current' for every model-shaping key whose values differ."""
    differences = []
    for key in MODEL_SHAPING_KEYS:
        group, name = key.split(".")
        old, new = stored[group][name], current[group][name]
        differs = list(old) != list(new) if isinstance(old, (list, tuple)) else old != new
        if differs:
            differences.append(f"{key}: checkpoint {old!r} vs config {new!r}")
    return differences


def check_model_compatible(checkpoint: dict, cfg: CN) -> None:
    """Raises CheckpointError listing model-shaping keys that differ between checkpoint and cfg."""
    differences = model_shape_differences(checkpoint_cfg(checkpoint), cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint '{checkpoint.get('path')}' was trained with a differently shaped model: "
            + "; ".join(differences)
        )


def load_model_weights(model: torch.nn.Module, checkpoint: dict, strict: bool = True) -> None:
    """Loads the checkpoint's weights into ``model`` (wrapped or not); a clear error on mismatch."""
    state = {key.removeprefix("module."): value for key, value in checkpoint["model"].items()}
    target = unwrap_model(model)
    try:
        result = target.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise CheckpointError(
            f"checkpoint '{checkpoint.get('path')}' does not fit the model: {detail}"
        ) from None
    return result


def without_unused_lsd_head(checkpoint: dict, model: torch.nn.Module) -> dict:
    """The checkpoint without its ``lsd_head.*`` weights when ``model`` has no descriptor head.

    The local-shape-descriptor head is an auxiliary training target that inference never reads, so a
    config without it may evaluate, or fine-tune from, a checkpoint that has one.
    """
    if getattr(unwrap_model(model), "lsd_head", None) is not None:
        return checkpoint
    state = {k: v for k, v in checkpoint["model"].items() if not k.removeprefix("module.").startswith("lsd_head.")}
    return {**checkpoint, "model": state}


def load_fine_tuning_weights(model: torch.nn.Module, checkpoint: dict) -> list[str]:
    """``--supervised_checkpoint``: every weight of ``model`` from ``checkpoint``, except a descriptor head.

    A checkpoint's descriptor head is dropped when the model has none; a model with a descriptor head
    that the checkpoint lacks keeps that head's fresh initialisation. Anything else that does not fit is
    a CheckpointError. Returns the names of the parameters left fresh.
    """
    result = load_model_weights(model, without_unused_lsd_head(checkpoint, model), strict=False)
    fresh = [key for key in result.missing_keys if key.startswith("lsd_head.")]
    missing = [key for key in result.missing_keys if not key.startswith("lsd_head.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint '{checkpoint.get('path')}' does not fit the model "
            f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    return fresh


def build_model_from_checkpoint(
    path: str | os.PathLike, cfg: CN | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, CN, dict]:
    """Model in eval mode with the checkpoint's weights; ``cfg`` (if given) must match its shape."""
    from melecole.models import build_model

    checkpoint = load_checkpoint(path)
    if cfg is not None:
        check_model_compatible(checkpoint, cfg)
    else:
        cfg = checkpoint_cfg(checkpoint)
    model = build_model(cfg)
    load_model_weights(model, without_unused_lsd_head(checkpoint, model))
    model.to(device).eval()
    return model, cfg, checkpoint


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike, cfg: CN) -> list[str]:
    """Loads a (contrastive pre-training) checkpoint's network weights except the heads.

    The model-shaping keys must match except MODEL.EMBEDDING_DIMENSION (the heads are not loaded).
    Returns the names of the parameters that keep their fresh initialisation (the heads).
    """
    checkpoint = load_checkpoint(path)
    differences = [
        d for d in model_shape_differences(checkpoint_cfg(checkpoint), cfg)
        if not d.startswith("MODEL.EMBEDDING_DIMENSION")
    ]
    if differences:
        raise CheckpointError(
            f"--ssl_checkpoint '{checkpoint['path']}' has a differently shaped backbone: " + "; ".join(differences)
        )
    state = {
        key.removeprefix("module."): value
        for key, value in checkpoint["model"].items()
        if not key.removeprefix("module.").startswith(HEAD_PREFIXES)
    }
    result = unwrap_model(model).load_state_dict(state, strict=False)
    if result.unexpected_keys or any(not key.startswith(HEAD_PREFIXES) for key in result.missing_keys):
        raise CheckpointError(
            f"--ssl_checkpoint '{checkpoint['path']}' does not fit the backbone "
            f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    return list(result.missing_keys)
