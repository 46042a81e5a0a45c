"""Training objectives: what the trainer calls for one step's loss.

An objective runs the online network on a batch and returns ``(loss, terms)``; it owns whatever
state its loss needs besides the network (for MoCo: projection heads, momentum network, queue)
and gives it to the checkpoint through ``state_dict`` / ``load_state_dict``.

- :class:`MetricObjective`: metric loss + foreground BCE on labelled patches.
- :class:`ContrastiveObjective`: dense MoCo InfoNCE on view pairs; "joint" adds the metric loss on
  labelled patches (metric + MOCO.WEIGHT * InfoNCE), "pretrain" is InfoNCE alone.

:data:`OBJECTIVE_REGISTRY` has one entry per objective (its builder, the config keys it reads, the
batches it trains on), under the names of :data:`melecole.config.validate.OBJECTIVE_SELECTION`: no
config key names the objective, MOCO.ENABLED and MOCO.MODE select it (:func:`objective_name`).
``build_objective(cfg, model, device, world_size)`` builds the selected one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Tuple

import torch
from torch import nn
from yacs.config import CfgNode as CN

from melecole.config.validate import OBJECTIVE_SELECTION, objective_name
from melecole.errors import CheckpointError, ConfigError
from melecole.losses.metric import MetricLoss, build_metric_loss
from melecole.models import build_dense_moco
from melecole.models.moco import DenseMoCo
from melecole.utils.comm import unwrap_model

__all__ = [
    "MOCO_CHECKPOINT_KEY",
    "OBJECTIVE_REGISTRY",
    "ContrastiveObjective",
    "MetricObjective",
    "ObjectiveEntry",
    "build_objective",
    "get_objective_entry",
    "objective_name",
    "selected_objective",
]

# The checkpoint entry of the MoCo state (projection heads, momentum network, queue, pointer).
MOCO_CHECKPOINT_KEY = "moco"

Batch = Dict[str, torch.Tensor]
Terms = Dict[str, torch.Tensor]
Autocast = Callable[[], ContextManager]


class MetricObjective:
    """Metric loss (+ foreground BCE) of the network's outputs on ``batch["raw"]``.

    Args:
        criterion: ``criterion(outputs, labels) -> (total, terms)``, e.g. :class:`MetricLoss`.
    """

    def __init__(self, criterion: MetricLoss) -> None:
        self.criterion = criterion

    def parameters(self) -> list:
        """Trainable parameters besides the network's (none)."""
        return []

    def __call__(self, model: nn.Module, batch: Batch, autocast: Autocast = contextlib.nullcontext) -> Tuple:
        """``batch``: "raw" ``(B, 1, Z, Y, X)``, "labels" ``(B, Z, Y, X)``, with LOSS.LSD_WEIGHT > 0 "lsd"
        ``(B, 10, Z, Y, X)``. Returns (loss, terms)."""
        with autocast():
            outputs = model(batch["raw"])
        outputs = {name: value.float() for name, value in outputs.items()}
        return self.criterion(outputs, batch["labels"], batch.get("lsd"))

    def state_dict(self) -> dict:
        """Checkpoint entries of this objective (none)."""
        return {}

    def load_state_dict(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Restores the objective's entries of a checkpoint dict (none)."""


class ContrastiveObjective(MetricObjective):
    """Dense MoCo, alone (``pretrain``) or beside the metric loss (joint: metric + weight * InfoNCE).

    One pass of the online network per step: the labelled patches (joint) and the first views go
    through it together (DDP allows one forward per backward; group/instance norm keep samples
    apart), then :class:`DenseMoCo` contrasts the views.

    Args:
        criterion: the metric criterion (joint mode; also used for validation).
        moco: the DenseMoCo module (its state is this objective's checkpoint entry "moco").
        weight: MOCO.WEIGHT. pretrain: InfoNCE only, no labelled patches.
        projection: the online projection head to call instead of ``moco.projection`` (its DDP
            wrapper when several processes train).
    """

    def __init__(
        self,
        criterion: MetricLoss,
        moco: DenseMoCo,
        weight: float = 1.0,
        pretrain: bool = False,
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__(criterion)
        self.moco = moco
        self.weight = float(weight)
        self.pretrain = bool(pretrain)
        self.projection = projection

    def parameters(self) -> list:
        """The online projection head's parameters."""
        return self.moco.trainable_parameters()

    def __call__(self, model: nn.Module, batch: Batch, autocast: Autocast = contextlib.nullcontext) -> Tuple:
        """``batch``: "view1", "view2" ``(B', 1, Z, Y, X)``, "coords1", "coords2" ``(B', N, 3)``,
        "view_groups" ``(B', N)``, and in joint mode "raw" and "labels". Returns (loss, terms)."""
        self.moco.train()
        self.moco.momentum_update(model)
        view1 = batch["view1"]
        labelled = 0 if self.pretrain else batch["raw"].shape[0]
        inputs = view1 if self.pretrain else torch.cat([batch["raw"], view1], dim=0)
        options = {"return_features": True} if self.moco.projection_input == "features" else {}
        groups = batch["view_groups"].reshape(-1) if self.moco.supervised else None
        with autocast():
            outputs = model(inputs, **options)
            source = self.moco.source_map(outputs)[labelled:]
            contrastive, terms = self.moco(
                source, batch["view2"], batch["coords1"], batch["coords2"], groups, self.projection
            )
        outputs.pop("features", None)
        terms = {"moco_infonce": contrastive.detach(), **terms}
        if self.pretrain:
            # The heads are unused here; a zero-weighted term gives every parameter a (zero) gradient,
            # which DDP expects. It changes neither the loss nor any update.
            unused = sum(value.float().mean() for value in outputs.values())
            return contrastive + 0.0 * unused, terms
        supervised_outputs = {name: value[:labelled].float() for name, value in outputs.items()}
        metric, metric_terms = self.criterion(supervised_outputs, batch["labels"], batch.get("lsd"))
        return metric + self.weight * contrastive, {**metric_terms, "metric_loss": metric.detach(), **terms}

    def state_dict(self) -> dict:
        """{"moco": projection heads, momentum network, queue and pointer}."""
        return {MOCO_CHECKPOINT_KEY: self.moco.state_dict()}

    def load_state_dict(self, checkpoint: dict, source: str = "checkpoint") -> None:
        state = checkpoint.get(MOCO_CHECKPOINT_KEY)
        if state is None:
            raise CheckpointError(f"{source} has no 'moco' state (it was not a MOCO.ENABLED run)")
        try:
            self.moco.load_state_dict(state)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise CheckpointError(f"{source}: MoCo state does not fit ({first_line})") from None


# Builders of the registry: (cfg, model, device, world_size) -> objective.
def _build_metric(cfg: CN, model: nn.Module, device: torch.device, world_size: int = 1) -> MetricObjective:
    return MetricObjective(build_metric_loss(cfg).to(device))


def _build_contrastive(
    cfg: CN, model: nn.Module, device: torch.device, world_size: int, pretrain: bool
) -> ContrastiveObjective:
    criterion = build_metric_loss(cfg).to(device)
    moco = build_dense_moco(cfg, unwrap_model(model)).to(device)
    projection = None
    if world_size > 1:
        # DDP broadcasts rank 0's head; the momentum head and the queue must follow it.
        device_ids = [device.index] if device.type == "cuda" else None
        projection = nn.parallel.DistributedDataParallel(moco.projection, device_ids=device_ids)
        moco.momentum_projection.load_state_dict(moco.projection.state_dict())
        torch.distributed.broadcast(moco.queue, src=0)
    return ContrastiveObjective(criterion, moco, weight=cfg.MOCO.WEIGHT, pretrain=pretrain, projection=projection)


def _build_joint(cfg: CN, model: nn.Module, device: torch.device, world_size: int = 1) -> ContrastiveObjective:
    return _build_contrastive(cfg, model, device, world_size, pretrain=False)


def _build_pretrain(cfg: CN, model: nn.Module, device: torch.device, world_size: int = 1) -> ContrastiveObjective:
    return _build_contrastive(cfg, model, device, world_size, pretrain=True)


Builder = Callable[[CN, nn.Module, torch.device, int], MetricObjective]


@dataclass(frozen=True)
class ObjectiveEntry:
    """One training objective of :data:`OBJECTIVE_REGISTRY`.

    Attributes:
        name: its key (also a key of ``OBJECTIVE_SELECTION``).
        build: ``build(cfg, model, device, world_size) -> objective``.
        keys: the config keys ``build`` reads ("LOSS" = every LOSS.* key).
        labelled: trains on labelled patches ("raw", "labels") and is validated on them.
        views: trains on MoCo view pairs ("view1", "view2", "coords1", "coords2", "view_groups").
    """

    name: str
    build: Builder
    keys: Tuple[str, ...]
    labelled: bool
    views: bool

    @property
    def selected_by(self) -> Dict[str, Any]:
        """The config values that select this objective, e.g. {"MOCO.ENABLED": False}."""
        return dict(OBJECTIVE_SELECTION[self.name])


_METRIC_KEYS = ("LOSS", "INFERENCE.OFFSETS")
_MOCO_KEYS = _METRIC_KEYS + ("MOCO", "MODEL.FILTERS", "MODEL.EMBEDDING_DIMENSION")

# objective name -> entry; the names are those of melecole.config.validate.OBJECTIVE_SELECTION.
OBJECTIVE_REGISTRY: Dict[str, ObjectiveEntry] = {
    entry.name: entry
    for entry in (
        ObjectiveEntry("metric", _build_metric, _METRIC_KEYS, labelled=True, views=False),
        ObjectiveEntry("moco_joint", _build_joint, _MOCO_KEYS, labelled=True, views=True),
        ObjectiveEntry("moco_pretrain", _build_pretrain, _MOCO_KEYS, labelled=False, views=True),
    )
}


def get_objective_entry(name: str) -> ObjectiveEntry:
    """The registry entry of an objective name; an unknown name is a ConfigError listing the valid ones."""
    if name not in OBJECTIVE_REGISTRY:
        raise ConfigError(f"unknown training objective {name!r}; valid: {', '.join(OBJECTIVE_REGISTRY)}")
    return OBJECTIVE_REGISTRY[name]


def selected_objective(cfg: CN) -> ObjectiveEntry:
    """The registry entry of the objective that MOCO.ENABLED / MOCO.MODE select."""
    return get_objective_entry(objective_name(cfg))


def build_objective(
    cfg: CN, model: nn.Module, device: torch.device, world_size: int = 1
) -> MetricObjective | ContrastiveObjective:
    """The objective that MOCO.ENABLED / MOCO.MODE select, for the online ``model`` (DDP-wrapped when
    world_size > 1), configured by LOSS.* and MOCO.*.

    Call it after wrapping (and so synchronising) the model: the momentum network is copied from it.
    """
    return selected_objective(cfg).build(cfg, model, device, world_size)
