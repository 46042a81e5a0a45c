"""Losses: the metric loss (+ foreground BCE) and ``build_criterion(cfg)``."""

from __future__ import annotations

from yacs.config import CfgNode as CN

from melecole.losses.metric import MetricLoss, build_metric_loss, metric_loss_terms, vector_norm

__all__ = ["MetricLoss", "build_criterion", "metric_loss_terms", "vector_norm"]


def build_criterion(cfg: CN) -> MetricLoss:
    """The supervised criterion from LOSS.*: ``criterion(outputs, labels) -> (total, terms)``.

    The MoCo InfoNCE term is added by the MoCo module, not here.
    """
    return build_metric_loss(cfg)
