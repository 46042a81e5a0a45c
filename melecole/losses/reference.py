"""A deliberately plain, loop-based metric loss: the ground truth for tests and the benchmark.

Loops over patches, objects and object pairs one at a time, exactly as the formulas read in
:mod:`melecole.losses.metric`. Slow; never use it for training.
"""

from __future__ import annotations

from typing import Dict

import torch

from melecole.losses.metric import vector_norm


def reference_metric_loss(
    embedding: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float,
    delta_d: float,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    norm: str = "l2",
) -> Dict[str, torch.Tensor]:
    """Metric loss terms by explicit loops.

    Args:
        embedding: (B, E, Z, Y, X).
        labels: (B, Z, Y, X), 0 ignored.

    Returns:
        {"pull", "push", "regularizer", "metric"} scalars, averaged over patches with >= 1 object.
    """
    pulls, pushes, regularizers = [], [], []
    for b in range(embedding.shape[0]):
        ids = [int(i) for i in torch.unique(labels[b]) if int(i) != 0]
        if not ids:
            continue  # a patch without objects contributes nothing
        means = []
        pull = embedding.new_zeros(())
        for object_id in ids:
            mask = labels[b] == object_id
            vectors = embedding[b][:, mask].T  # (voxels, E)
            mean = vectors.mean(0)
            means.append(mean)
            distances = vector_norm(vectors - mean, norm)
            pull = pull + torch.clamp(distances - delta_v, min=0).pow(2).mean()
        pull = pull / len(ids)
        push = embedding.new_zeros(())
        pairs = 0
        for k in range(len(means)):
            for l in range(len(means)):
                if k == l:
                    continue
                distance = vector_norm(means[k] - means[l], norm)
                push = push + torch.clamp(2 * delta_d - distance, min=0).pow(2)
                pairs += 1
        if pairs:
            push = push / pairs
        regularizer = sum(vector_norm(mean, norm) for mean in means) / len(means)
        pulls.append(pull)
        pushes.append(push)
        regularizers.append(regularizer)
    if not pulls:
        zero = embedding.sum() * 0.0
        return {"pull": zero, "push": zero, "regularizer": zero, "metric": zero}
    pull = torch.stack(pulls).mean()
    push = torch.stack(pushes).mean()
    regularizer = torch.stack(regularizers).mean()
    metric = alpha * pull + beta * push + gamma * regularizer
    return {"pull": pull, "push": push, "regularizer": regularizer, "metric": metric}
