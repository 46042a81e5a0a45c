"""Optimizer and learning-rate schedule from the OPTIM config group."""

from __future__ import annotations

import math

import torch
from yacs.config import CfgNode as CN


def build_optimizer(cfg: CN, parameters) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over ``parameters`` with OPTIM.INITIAL_LR and OPTIM.WEIGHT_DECAY."""
    lr, weight_decay = cfg.OPTIM.INITIAL_LR, cfg.OPTIM.WEIGHT_DECAY
    name = cfg.OPTIM.OPTIMIZER
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=cfg.OPTIM.MOMENTUM, weight_decay=weight_decay, nesterov=True)


def lr_factor(
    iteration: int,
    *,
    schedule: str,
    total_iterations: int,
    warmup_iterations: int = 0,
    min_factor: float = 0.0,
    step_size: int = 1,
    step_gamma: float = 1.0,
) -> float:
    """Multiplier of the initial learning rate at ``iteration`` (0-based, before the step is taken)."""
    if warmup_iterations > 0 and iteration < warmup_iterations:
        return (iteration + 1) / warmup_iterations
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return step_gamma ** (iteration // max(1, step_size))
    # cosine from 1 down to min_factor over the iterations after the warm-up
    span = max(1, total_iterations - warmup_iterations)
    progress = min(1.0, (iteration - warmup_iterations) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: CN, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (OPTIM.SCHEDULER) with linear warm-up (OPTIM.WARMUP_ITER)."""
    min_factor = min(1.0, cfg.OPTIM.MIN_LR / cfg.OPTIM.INITIAL_LR)
    options = dict(
        schedule=cfg.OPTIM.SCHEDULER,
        total_iterations=cfg.OPTIM.TOTAL_ITER,
        warmup_iterations=cfg.OPTIM.WARMUP_ITER,
        min_factor=min_factor,
        step_size=cfg.OPTIM.STEP_SIZE,
        step_gamma=cfg.OPTIM.STEP_GAMMA,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, **options))
