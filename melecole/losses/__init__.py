"""Losses: the metric loss (+ foreground BCE), ``build_criterion(cfg)`` and the training objectives
(``OBJECTIVE_REGISTRY``, ``build_objective``)."""

from __future__ import annotations

from yacs.config import CfgNode as CN

from melecole.losses.metric import MetricLoss, build_metric_loss, metric_loss_terms, vector_norm
from melecole.losses.objectives import (
    OBJECTIVE_REGISTRY,
    ContrastiveObjective,
    MetricObjective,
    ObjectiveEntry,
    build_objective,
    get_objective_entry,
    selected_objective,
)

__all__ = [
    "OBJECTIVE_REGISTRY",
    "ContrastiveObjective",
    "MetricLoss",
    "MetricObjective",
    "ObjectiveEntry",
    "build_criterion",
    "build_objective",
    "get_objective_entry",
    "metric_loss_terms",
    "selected_objective",
    "vector_norm",
]


def build_criterion(cfg: CN) -> MetricLoss:
    """The supervised criterion from LOSS.*: ``criterion(outputs, labels) -> (total, terms)``.

    The MoCo InfoNCE term is added by :class:`ContrastiveObjective`, not here.
    """
    return build_metric_loss(cfg)
