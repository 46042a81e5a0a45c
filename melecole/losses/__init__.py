"""Losses: the metric loss (+ foreground BCE), ``build_criterion(cfg)`` and the training objectives."""

from __future__ import annotations

from yacs.config import CfgNode as CN

from melecole.losses.metric import MetricLoss, build_metric_loss, metric_loss_terms, vector_norm
from melecole.losses.objectives import ContrastiveObjective, MetricObjective, build_objective

__all__ = [
    "ContrastiveObjective",
    "MetricLoss",
    "MetricObjective",
    "build_criterion",
    "build_objective",
    "metric_loss_terms",
    "vector_norm",
]


def build_criterion(cfg: CN) -> MetricLoss:
    """The supervised criterion from LOSS.*: ``criterion(outputs, labels) -> (total, terms)``.

    The MoCo InfoNCE term is added by :class:`ContrastiveObjective`, not here.
    """
    return build_metric_loss(cfg)
