"""The training loader of a run: labelled patches, view pairs (MoCo pretrain), or both (MoCo joint)."""

from __future__ import annotations

from typing import Dict, Iterable, Iterator

import torch
from yacs.config import CfgNode as CN

from melecole.losses.objectives import selected_objective

__all__ = ["ZipLoader", "build_training_loader"]


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


def build_training_loader(
    cfg: CN, start_iteration: int = 0, rank: int = 0, world_size: int = 1
) -> Iterable[Dict[str, torch.Tensor]]:
    """Batches from iteration ``start_iteration`` on, for the objective that MOCO.* selects.

    Labelled patches ("raw", "labels") for an objective that trains on them (metric, moco_joint),
    view pairs ("view1", "view2", "coords1", "coords2", "view_groups") for one that trains on views
    (moco_pretrain, moco_joint); both zipped into one dict per step.
    """
    from melecole.data import build_train_loader

    objective = selected_objective(cfg)
    views = None
    if objective.views:
        from melecole.data.views import build_view_loader

        views = build_view_loader(cfg, start_iteration=start_iteration, rank=rank)
    if not objective.labelled:
        return views
    labelled = build_train_loader(cfg, start_iteration=start_iteration, rank=rank, world_size=world_size)
    return labelled if views is None else ZipLoader(labelled, views)
