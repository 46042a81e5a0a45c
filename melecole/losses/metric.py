"""Lee et al. (2019) metric loss on voxel embeddings (De Brabandere et al. 2017 discriminative loss)
plus a BCE loss on the foreground head.

Per patch b with objects k = 1..K_b (ground-truth ids != 0; id 0 is ignored), with object means mu_k:

    pull_b = mean_k mean_{p in k} max(0, ||e_p - mu_k|| - delta_v)^2
    push_b = mean_{k != l} max(0, 2 delta_d - ||mu_k - mu_l||)^2      (0 when K_b < 2)
    reg_b  = mean_k ||mu_k||
    metric = mean over patches with K_b >= 1 of (alpha pull_b + beta push_b + gamma reg_b)

The whole batch is handled at once: (patch, id) pairs are remapped to consecutive segment indices,
means and per-voxel terms use ``index_add_`` and the push term a padded (B, K, K) distance matrix.
No Python loop runs over objects or patches.
"""

from __future__ import annotations

from typing import Dict, Literal, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from yacs.config import CfgNode as CN

from melecole.utils.offsets import offset_slices

NormName = Literal["l1", "l2"]

# The l2 distance is sqrt(sum of squares + L2_EPS): its gradient is finite (0) where two vectors are
# equal, which plain sqrt is not (d sqrt(s)/ds = inf at 0 gives NaN). It changes a distance d by
# about L2_EPS / (2 d), i.e. < 1e-7 for d > 0.005, and a zero distance reads sqrt(L2_EPS) = 1e-5.
L2_EPS = 1e-10

TERM_NAMES = ("pull", "push", "regularizer", "affinity", "metric", "foreground", "lsd", "total")


def vector_norm(vectors: torch.Tensor, norm: str, dim: int = -1) -> torch.Tensor:
    """l1 or l2 (with ``L2_EPS``, see above) norm of ``vectors`` along ``dim``."""
    if norm == "l1":
        return vectors.abs().sum(dim)
    if norm == "l2":
        return torch.sqrt(vectors.pow(2).sum(dim) + L2_EPS)
    raise ValueError(f"unknown norm {norm!r}; valid: l1, l2")


def _segment_ids(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remaps (patch, ground-truth id) pairs to consecutive segment indices 0..S-1.

    Args:
        labels: (B, N) int64 ids, 0 = ignored.

    Returns:
        voxel_index: (M,) flat indices into B*N of the labelled voxels.
        segment: (M,) segment index of each labelled voxel.
        segment_batch: (S,) patch of each segment (sorted ascending).
        counts: (S,) voxels per segment.
    """
    batch_size, voxels = labels.shape
    flat = labels.reshape(-1)
    voxel_index = torch.nonzero(flat != 0, as_tuple=True)[0]
    ids = flat[voxel_index]
    batch = torch.div(voxel_index, voxels, rounding_mode="floor")
    if ids.numel() and (int(ids.max()) >= 2**62 // max(batch_size, 1) or int(ids.min()) < 0):
        # Huge or negative ids: compress them first so the combined key below cannot overflow.
        ids = torch.unique(ids, return_inverse=True)[1] + 1
    span = int(ids.max()) + 1 if ids.numel() else 1
    # One key per (patch, id): the same id in two patches is two objects (labels are per patch).
    keys, segment, counts = torch.unique(batch * span + ids, return_inverse=True, return_counts=True)
    segment_batch = torch.div(keys, span, rounding_mode="floor")
    return voxel_index, segment, segment_batch, counts


def metric_loss_terms(
    embedding: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float,
    delta_d: float,
    norm: str = "l2",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted pull, push and regulariser per patch.

    Args:
        embedding: (B, E, Z, Y, X) float.
        labels: (B, Z, Y, X) integer ids, 0 ignored.

    Returns:
        pull, push, regularizer: (B,) each, 0 for patches without objects.
        objects: (B,) number of objects per patch.
    """
    batch_size, channels = embedding.shape[:2]
    if labels.shape != embedding.shape[:1] + embedding.shape[2:]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match embedding shape {tuple(embedding.shape)} "
            "(expected labels (B, Z, Y, X) for embedding (B, E, Z, Y, X))"
        )
    if embedding.dtype in (torch.float16, torch.bfloat16):
        embedding = embedding.float()  # AMP: sums over many voxels need at least float32
    voxel_index, segment, segment_batch, counts = _segment_ids(labels.reshape(batch_size, -1).long())
    num_segments = counts.numel()
    device = embedding.device

    # (B*N, E) voxel-major view; only the labelled voxels are gathered: (M, E).
    vectors = embedding.reshape(batch_size, channels, -1).transpose(1, 2).reshape(-1, channels)
    vectors = vectors.index_select(0, voxel_index)
    counts_float = counts.to(embedding.dtype)

    sums = embedding.new_zeros(num_segments, channels).index_add_(0, segment, vectors)
    means = sums / counts_float[:, None]  # (S, E)

    # Pull: hinge on each voxel's distance to its own mean, averaged per segment.
    distance = vector_norm(vectors - means.index_select(0, segment), norm)  # (M,)
    hinge = F.relu(distance - delta_v).pow(2)
    pull_segment = embedding.new_zeros(num_segments).index_add_(0, segment, hinge) / counts_float

    objects = torch.bincount(segment_batch, minlength=batch_size)  # (B,)
    per_patch = objects.clamp(min=1).to(embedding.dtype)
    pull = embedding.new_zeros(batch_size).index_add_(0, segment_batch, pull_segment) / per_patch
    regularizer = (
        embedding.new_zeros(batch_size).index_add_(0, segment_batch, vector_norm(means, norm)) / per_patch
    )

    # Push: means scattered into a padded (B, K, E) tensor, then all (B, K, K) pairwise distances.
    # Segments are sorted by patch, so a segment's slot is its rank inside its patch.
    max_objects = int(objects.max()) if num_segments else 0
    first = torch.cumsum(objects, 0) - objects  # (B,) index of each patch's first segment
    slot = torch.arange(num_segments, device=device) - first[segment_batch]
    padded = embedding.new_zeros(batch_size, max_objects, channels)
    padded = padded.index_put((segment_batch, slot), means)
    valid = torch.zeros(batch_size, max_objects, dtype=torch.bool, device=device)
    valid[segment_batch, slot] = True
    pair_distance = vector_norm(padded[:, :, None, :] - padded[:, None, :, :], norm)  # (B, K, K)
    pairs = valid[:, :, None] & valid[:, None, :]
    pairs &= ~torch.eye(max_objects, dtype=torch.bool, device=device)
    push_pairs = torch.where(pairs, F.relu(2 * delta_d - pair_distance).pow(2), 0.0)
    pair_count = (objects * (objects - 1)).clamp(min=1).to(embedding.dtype)
    push = push_pairs.sum((1, 2)) / pair_count
    return pull, push, regularizer, objects


def affinity_loss_term(
    embedding: torch.Tensor,
    labels: torch.Tensor,
    offsets: Sequence[Sequence[int]],
    delta_d: float,
    norm: str = "l2",
) -> torch.Tensor:
    """Class-balanced squared error of the embedding affinities the inference will use.

    For every offset o and labelled pair (p, p + o) (both ids != 0, both inside the patch), the
    affinity ``a = max(0, 1 - ||e_p - e_{p+o}|| / (2 delta_d))^2`` (docs/ARCHITECTURE.md; the same
    formula as ``melecole.inference.affinities``, here with autograd) should be 1 for the same id and
    0 for different ids. Returns ``0.5 * (mean over same-id pairs of (1 - a)^2 + mean over
    different-id pairs of a^2)`` (a class absent from the batch contributes 0). Unlike pull / push,
    which act on object means, this acts on the voxels next to a boundary, where the watershed cuts.

    Args:
        embedding: (B, E, Z, Y, X) float; labels: (B, Z, Y, X) integer ids, 0 ignored.
    """
    if embedding.dtype in (torch.float16, torch.bfloat16):
        embedding = embedding.float()
    shape = tuple(embedding.shape[2:])
    totals = [embedding.new_zeros(()), embedding.new_zeros(())]  # same-id, different-id sums
    counts = [0, 0]
    for offset in offsets:
        slices = offset_slices(shape, offset)
        if slices is None:
            continue
        source, target = ((slice(None),) + part for part in slices)
        first, second = labels[source], labels[target]
        labelled = (first != 0) & (second != 0)
        same, different = labelled & (first == second), labelled & (first != second)
        if not bool(labelled.any()):
            continue
        channels = (slice(None), slice(None)) + slices[0], (slice(None), slice(None)) + slices[1]
        distance = vector_norm(embedding[channels[0]] - embedding[channels[1]], norm, dim=1)
        affinity = F.relu(1.0 - distance / (2.0 * delta_d)).pow(2)
        totals[0] = totals[0] + torch.where(same, (1.0 - affinity).pow(2), 0.0).sum()
        totals[1] = totals[1] + torch.where(different, affinity.pow(2), 0.0).sum()
        counts[0] += int(same.sum())
        counts[1] += int(different.sum())
    means = [total / count for total, count in zip(totals, counts) if count > 0]
    return 0.5 * sum(means) if means else embedding.new_zeros(())


class MetricLoss(nn.Module):
    """Metric loss on ``outputs["embedding"]`` + weighted BCE on ``outputs["foreground"]``.

    Args:
        delta_v: pull hinge margin.
        delta_d: push hinge margin (means further apart than 2 * delta_d cost nothing).
        alpha, beta, gamma: weights of pull, push and the regulariser (gamma multiplies it).
        norm: l1 | l2 distance, for both hinges and the regulariser.
        foreground_weight: weight of BCE(foreground logits, labels != 0); 0 disables it (and the
            ``foreground`` output is then not needed).
        affinity_weight: weight of :func:`affinity_loss_term` on ``offsets``.
        lsd_weight: weight of the local-shape-descriptor term: mean over labelled voxels and the
            channels of (sigmoid(``outputs["lsd"]``) - target)^2, the target being the loader's
            ``batch["lsd"]`` (:mod:`melecole.data.lsd`). Counted only when both are given (an
            evaluating network returns no ``"lsd"``: validation losses leave the term at 0).

    ``forward`` returns ``(total, terms)``. ``terms`` holds scalar tensors (not detached) "pull", "push",
    "regularizer" (unweighted, averaged over patches with >= 1 object), "metric" (the weighted sum of
    those three), "foreground" (unweighted BCE) and "total" = metric + foreground_weight * foreground.
    Patches without objects contribute nothing to the metric part; if no patch has one, it is 0.
    """

    def __init__(
        self,
        delta_v: float = 0.5,
        delta_d: float = 1.5,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.001,
        norm: NormName = "l2",
        foreground_weight: float = 1.0,
        affinity_weight: float = 0.0,
        offsets: Sequence[Sequence[int]] = (),
        lsd_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in ("l1", "l2"):
            raise ValueError(f"unknown norm {norm!r}; valid: l1, l2")
        self.delta_v = float(delta_v)
        self.delta_d = float(delta_d)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.norm = norm
        self.foreground_weight = float(foreground_weight)
        self.affinity_weight = float(affinity_weight)
        self.lsd_weight = float(lsd_weight)
        self.offsets = [tuple(int(v) for v in offset) for offset in offsets]
        if self.affinity_weight > 0 and not self.offsets:
            raise ValueError("affinity_weight > 0 needs the affinity offsets (INFERENCE.OFFSETS)")

    def forward(
        self, outputs: Dict[str, torch.Tensor], labels: torch.Tensor, lsd_target: torch.Tensor | None = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``outputs``: {"embedding": (B, E, Z, Y, X), "foreground": (B, 1, Z, Y, X) logits, optionally
        "lsd": (B, 10, Z, Y, X) logits}; ``labels``: (B, Z, Y, X) integer ids (0 = boundary /
        unlabelled); ``lsd_target``: (B, 10, Z, Y, X) in [0, 1] or None."""
        embedding = outputs["embedding"]
        pull, push, regularizer, objects = metric_loss_terms(
            embedding, labels, self.delta_v, self.delta_d, self.norm
        )
        has_objects = (objects > 0).to(pull.dtype)
        patches = has_objects.sum().clamp(min=1)
        # Patches with no objects have 0 in all three terms; dividing by the patches that have
        # objects gives their mean (0 if none, without NaN).
        pull_mean = (pull * has_objects).sum() / patches
        push_mean = (push * has_objects).sum() / patches
        regularizer_mean = (regularizer * has_objects).sum() / patches
        metric = self.alpha * pull_mean + self.beta * push_mean + self.gamma * regularizer_mean
        if self.affinity_weight > 0:
            affinity = affinity_loss_term(embedding, labels, self.offsets, self.delta_d, self.norm)
            metric = metric + self.affinity_weight * affinity
        else:
            affinity = metric.new_zeros(())
        # Keep the graph connected to the embedding even when there is no object, so backward()
        # never fails on an all-background batch.
        metric = metric + 0.0 * embedding.sum()

        if self.foreground_weight > 0:
            logits = outputs["foreground"]
            target = (labels != 0).to(torch.float32).reshape(logits.shape)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            target = target.to(logits.dtype)
            foreground = F.binary_cross_entropy_with_logits(logits, target)
        else:
            foreground = metric.new_zeros(())
        lsd = self._lsd_term(outputs.get("lsd"), labels, lsd_target, metric)
        total = metric + self.foreground_weight * foreground + self.lsd_weight * lsd
        terms = {
            "pull": pull_mean,
            "push": push_mean,
            "regularizer": regularizer_mean,
            "affinity": affinity,
            "metric": metric,
            "foreground": foreground,
            "lsd": lsd,
            "total": total,
        }
        return total, terms

    def _lsd_term(
        self, logits: torch.Tensor | None, labels: torch.Tensor, target: torch.Tensor | None, like: torch.Tensor
    ) -> torch.Tensor:
        """Masked mean squared error of the descriptor head (0 when off or either side is missing)."""
        if self.lsd_weight <= 0 or logits is None or target is None:
            return like.new_zeros(())
        if target.shape != logits.shape:
            raise ValueError(f"lsd target shape {tuple(target.shape)} does not match the head's {tuple(logits.shape)}")
        mask = (labels != 0).unsqueeze(1).to(logits.dtype)
        error = (torch.sigmoid(logits.float()) - target.float()).pow(2) * mask
        return error.sum() / (mask.sum() * logits.shape[1]).clamp(min=1.0)


def build_metric_loss(cfg: CN) -> MetricLoss:
    """MetricLoss from the LOSS.* keys."""
    return MetricLoss(
        delta_v=cfg.LOSS.DELTA_V,
        delta_d=cfg.LOSS.DELTA_D,
        alpha=cfg.LOSS.ALPHA,
        beta=cfg.LOSS.BETA,
        gamma=cfg.LOSS.GAMMA,
        norm=cfg.LOSS.NORM,
        foreground_weight=cfg.LOSS.FOREGROUND_WEIGHT,
        affinity_weight=cfg.LOSS.AFFINITY_WEIGHT,
        offsets=cfg.INFERENCE.OFFSETS,
        lsd_weight=cfg.LOSS.LSD_WEIGHT,
    )
