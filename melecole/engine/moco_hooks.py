"""MoCo inside the one training engine: what :class:`melecole.engine.trainer.Trainer` calls when
MOCO.ENABLED.

- :class:`MoCoHook` owns the :class:`melecole.models.moco.DenseMoCo` module (projection head,
  momentum network, queue + pointer buffers), builds the loader of view pairs (joint mode: zipped
  with the labelled patches), computes the losses of one step and gives its state to the checkpoint.
- :func:`load_backbone_weights` starts supervised fine-tuning from a contrastive pre-training run
  (``--ssl_checkpoint``): the network's weights except its heads.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Iterator

import torch
from torch import nn
from yacs.config import CfgNode as CN

from melecole.engine.checkpoint import checkpoint_cfg, load_checkpoint, model_shape_differences, unwrap_model
from melecole.errors import CheckpointError, ConfigError
from melecole.models.moco import DenseMoCo, capture_features

__all__ = ["MoCoHook", "ZipLoader", "load_backbone_weights", "build_dense_moco", "HEAD_PREFIXES"]

# Parameters that belong to the task heads, not the backbone (not loaded by --ssl_checkpoint).
HEAD_PREFIXES = ("embedding_head.", "foreground_head.")


def build_dense_moco(cfg: CN, encoder: nn.Module) -> DenseMoCo:
    """DenseMoCo from MOCO.* for the (unwrapped) online ``encoder``."""
    moco = cfg.MOCO
    if cfg.MODEL.NORM == "batch":
        raise ConfigError(
            "MOCO.ENABLED needs MODEL.NORM group, instance or none: batch norm lets queries and keys "
            "cheat through batch statistics (MoCo's shuffle-BN is not implemented)"
        )
    if moco.PROJECTION_INPUT not in ("features", "embedding"):
        raise ConfigError(
            f"MOCO.PROJECTION_INPUT must be features or embedding; got {moco.PROJECTION_INPUT!r}"
        )
    for key in ("QUEUE_SIZE", "NUM_SAMPLES", "PROJECTION_DIM"):
        if moco[key] < 1:
            raise ConfigError(f"MOCO.{key} must be >= 1, got {moco[key]}")
    if moco.PROJECTION_HIDDEN < 0 or moco.BATCH_SIZE < 0:
        raise ConfigError("MOCO.PROJECTION_HIDDEN and MOCO.BATCH_SIZE must be >= 0")
    if len(moco.MAX_SHIFT) != 3 or min(moco.MAX_SHIFT) < 0:
        raise ConfigError(f"MOCO.MAX_SHIFT expects 3 integers >= 0 (z, y, x), got {moco.MAX_SHIFT!r}")
    if moco.PROJECTION_INPUT == "features":
        channels = int(getattr(encoder, "feature_channels", cfg.MODEL.FILTERS[0]))
    else:
        channels = int(cfg.MODEL.EMBEDDING_DIMENSION)
    return DenseMoCo(
        encoder,
        feature_channels=channels,
        projection_dim=moco.PROJECTION_DIM,
        projection_hidden=moco.PROJECTION_HIDDEN,
        queue_size=moco.QUEUE_SIZE,
        momentum=moco.MOMENTUM,
        temperature=moco.TEMPERATURE,
        projection_input=moco.PROJECTION_INPUT,
        supervised=moco.SUPERVISED,
    )


class ZipLoader:
    """Iterates several loaders in step and merges their batch dicts (keys must differ)."""

    def __init__(self, *loaders: Iterable[Dict[str, torch.Tensor]]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for batches in zip(*self.loaders):
            merged: Dict[str, torch.Tensor] = {}
            for batch in batches:
                merged.update(batch)
            yield merged


class MoCoHook:
    """Dense MoCo for a Trainer: module, loader, losses and checkpoint state.

    Args:
        cfg: frozen config with MOCO.ENABLED.
        model: the online network as the Trainer holds it (DDP-wrapped when world size > 1, and
            already synchronised: the momentum copy is taken from it).
        device: training device. world_size: processes.
    """

    def __init__(self, cfg: CN, model: nn.Module, device: torch.device, world_size: int = 1) -> None:
        self.cfg = cfg
        self.mode = cfg.MOCO.MODE
        self.weight = float(cfg.MOCO.WEIGHT)
        self.module = build_dense_moco(cfg, unwrap_model(model)).to(device)
        self.projection: nn.Module = self.module.projection
        if world_size > 1:
            # DDP broadcasts rank 0's head; the momentum head and the queue must follow it.
            device_ids = [device.index] if device.type == "cuda" else None
            self.projection = nn.parallel.DistributedDataParallel(
                self.module.projection, device_ids=device_ids
            )
            self.module.momentum_projection.load_state_dict(self.module.projection.state_dict())
            torch.distributed.broadcast(self.module.queue, src=0)

    @property
    def pretrain(self) -> bool:
        return self.mode == "pretrain"

    def parameters(self) -> list:
        """Trainable parameters besides the network's (the online projection head)."""
        return self.module.trainable_parameters()

    def build_loader(
        self, start_iteration: int, rank: int, world_size: int
    ) -> Iterable[Dict[str, torch.Tensor]]:
        """View pairs (pretrain), or labelled patches zipped with view pairs (joint)."""
        from melecole.data import build_train_loader
        from melecole.data.views import build_view_loader

        views = build_view_loader(self.cfg, start_iteration=start_iteration, rank=rank)
        if self.pretrain:
            return views
        labelled = build_train_loader(
            self.cfg, start_iteration=start_iteration, rank=rank, world_size=world_size
        )
        return ZipLoader(labelled, views)

    def compute_losses(self, trainer: Any, batch: Dict[str, torch.Tensor]) -> tuple:
        """One step's loss: metric loss + MOCO.WEIGHT * InfoNCE (joint) or InfoNCE (pretrain).

        The labelled patches (joint) and the first views go through the online network in ONE
        forward (DDP allows one forward per backward; group/instance norm keep samples apart).
        Returns (loss, terms) like ``Trainer.compute_losses``.
        """
        self.module.train()
        self.module.momentum_update(trainer.model)
        view1 = batch["view1"]  # (B', 1, Z, Y, X)
        labelled = 0 if self.pretrain else batch["raw"].shape[0]
        inputs = view1 if self.pretrain else torch.cat([batch["raw"], view1], dim=0)
        use_features = self.module.projection_input == "features"
        capture = capture_features(trainer.model) if use_features else contextlib.nullcontext({})
        with trainer.autocast():
            with capture as store:
                outputs = trainer.model(inputs)
            features = store["features"][labelled:] if use_features else None
            view_outputs = {name: value[labelled:] for name, value in outputs.items()}
            query = self.module.encode_queries(view_outputs, features, batch["coords1"], self.projection)
            key = self.module.encode_keys(batch["view2"], batch["coords2"])
        groups = batch["view_groups"].reshape(-1) if self.module.supervised else None
        contrastive, terms = self.module.contrast(query.float(), key.float(), groups)
        terms = {"moco_infonce": contrastive.detach(), **terms}
        if self.pretrain:
            # The heads are unused here; a zero-weighted term gives every parameter a (zero) gradient,
            # which DDP expects. It changes neither the loss nor any update.
            unused = sum(value.float().mean() for value in outputs.values())
            return contrastive + 0.0 * unused, terms
        supervised_outputs = {name: value[:labelled].float() for name, value in outputs.items()}
        metric, metric_terms = trainer.criterion(supervised_outputs, batch["labels"])
        return metric + self.weight * contrastive, {**metric_terms, "metric_loss": metric.detach(), **terms}

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Projection heads, momentum network, queue and pointer (for the checkpoint's "moco" entry)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor] | None, source: str = "checkpoint") -> None:
        if state is None:
            raise CheckpointError(f"{source} has no 'moco' state (it was not a MOCO.ENABLED run)")
        try:
            self.module.load_state_dict(state)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise CheckpointError(f"{source}: MoCo state does not fit ({first_line})") from None


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, cfg: CN) -> list[str]:
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
            f"--ssl_checkpoint '{checkpoint['path']}' has a differently shaped backbone: "
            + "; ".join(differences)
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
