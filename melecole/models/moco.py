"""Dense (voxel-level) momentum contrast for the UNet3D embedding network (MoCo, He et al. 2020).

Two views of one 3D crop (see :mod:`melecole.data.views`) go through the online network and a
momentum (EMA) copy of it. At voxel locations visible in both views, the online projection in
view 1 is the query, the momentum projection at the corresponding voxel of view 2 its positive
key, and a queue of earlier keys supplies the negatives (InfoNCE with a temperature). With labels
(supervised contrast) every key of the same instance in the same crop is a positive as well.

The online network is not stored here: its owner runs it once per step (possibly wrapped in
DistributedDataParallel, labelled patches and first views in one pass) and hands its map of the
first views to :meth:`DenseMoCo.forward`; :meth:`DenseMoCo.momentum_update` takes the network.
This module holds what the checkpoint needs besides the network: the online projection head, the
momentum network and projection head, and the queue with its pointer as registered buffers.

Shapes: B crops, N sampled voxels per crop, M = B * N, C feature channels, D projection dim,
K queue length.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from melecole.utils import comm

ProjectionInput = Literal["features", "embedding"]

__all__ = [
    "ProjectionHead",
    "DenseMoCo",
    "info_nce",
    "supervised_info_nce",
    "gather_voxels",
    "concat_all_gather",
    "key_std",
]


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``(M, ...)`` per rank -> ``(world * M, ...)`` in rank order; the input itself in one process.

    No gradient flows through the gathered copies (keys never need one).
    """
    world_size = comm.get_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def gather_voxels(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Feature vectors at voxel coordinates.

    Args:
        volume: ``(B, C, Z, Y, X)`` feature maps.
        coords: ``(B, N, 3)`` integer (z, y, x) coordinates inside the maps.

    Returns:
        ``(B * N, C)``, crop-major (all N of crop 0 first).
    """
    batch, channels, depth, height, width = volume.shape
    coords = coords.to(device=volume.device, dtype=torch.long)
    flat_index = (coords[..., 0] * height + coords[..., 1]) * width + coords[..., 2]  # (B, N)
    flat = volume.reshape(batch, channels, depth * height * width)  # (B, C, ZYX)
    index = flat_index.unsqueeze(1).expand(-1, channels, -1)  # (B, C, N)
    picked = torch.gather(flat, 2, index)  # (B, C, N)
    return picked.transpose(1, 2).reshape(-1, channels)  # (B*N, C)


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> tuple:
    """MoCo InfoNCE: each query's positive is its own key, the queue holds the negatives.

    Args:
        query: ``(M, D)`` L2-normalised queries (with gradient).
        key: ``(M, D)`` L2-normalised positive keys (no gradient).
        queue: ``(K, D)`` L2-normalised negative keys.
        temperature: softmax temperature tau.

    Returns:
        (loss: scalar mean cross-entropy, logits: ``(M, 1 + K)`` with the positive in column 0).
    """
    positive = (query * key).sum(dim=1, keepdim=True)  # (M, 1)
    negative = query @ queue.t()  # (M, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (M, 1+K)
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, targets), logits


def supervised_info_nce(
    query: torch.Tensor, key: torch.Tensor, groups: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple:
    """Supervised contrast (SupCon "outside" form) against this step's keys and the queue.

    Query i's positives are the keys j with ``groups[j] == groups[i]`` (its own key always; with
    labels, every sampled voxel of the same instance in the same crop). All other keys of this
    step and the whole queue are negatives. The queue holds keys of earlier crops only, whose
    instances cannot be matched to this crop's, so it never holds positives.

    Args:
        query: ``(M, D)`` normalised queries. key: ``(M, D)`` normalised keys of the same voxels.
        groups: ``(M,)`` integer instance group per voxel; unique values for unlabelled voxels.
        queue: ``(K, D)`` normalised negatives. temperature: tau.

    Returns:
        (loss: scalar, mean over queries of -mean_{positives} log softmax;
         logits: ``(M, M + K)``, in-step keys first).
    """
    logits = torch.cat([query @ key.t(), query @ queue.t()], dim=1) / temperature  # (M, M+K)
    log_probability = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (M, M+K)
    positive = (groups[:, None] == groups[None, :]).to(log_probability.dtype)  # (M, M)
    positive_log_probability = (log_probability[:, : key.shape[0]] * positive).sum(dim=1)  # (M,)
    loss = -(positive_log_probability / positive.sum(dim=1)).mean()
    return loss, logits


def key_std(keys: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: mean over dimensions of the std over samples of normalised ``(M, D)`` keys.

    About ``1 / sqrt(D)`` for keys spread over the sphere; near 0 when all keys collapse to one point.
    """
    if keys.shape[0] < 2:
        return keys.new_tensor(float("nan"))
    return keys.float().std(dim=0).mean()


class ProjectionHead(nn.Module):
    """MLP applied to sampled voxel vectors: ``(M, C) -> (M, D)``.

    ``hidden`` > 0: Linear(C, hidden) -> ReLU -> Linear(hidden, D) (MoCo v2); ``hidden`` = 0: one
    Linear(C, D). No batch norm: its batch statistics would leak information between voxels.
    """

    def __init__(self, in_channels: int, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden > 0:
            self.layers: nn.Module = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
            )
        else:
            self.layers = nn.Linear(in_channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DenseMoCo(nn.Module):
    """Momentum encoder + projection heads + key queue for dense voxel contrast.

    Args:
        encoder: the online network (unwrapped), e.g. UNet3D (with ``forward_features`` when
            ``projection_input`` is "features"); it is deep-copied into the momentum network but
            not stored.
        feature_channels: C, channels of the vectors that the projection head reads (decoder
            features or the embedding, per ``projection_input``).
        projection_dim: D. projection_hidden: hidden width of the head (0 = linear).
        queue_size: K. momentum: EMA factor m (key <- m * key + (1 - m) * online).
        temperature: tau. projection_input: "features" (decoder features) or "embedding" (the
            embedding head's output). supervised: same-instance keys are positives where labelled.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_channels: int,
        projection_dim: int = 32,
        projection_hidden: int = 64,
        queue_size: int = 16384,
        momentum: float = 0.999,
        temperature: float = 0.1,
        projection_input: ProjectionInput = "features",
        supervised: bool = False,
    ) -> None:
        super().__init__()
        if projection_input not in ("features", "embedding"):
            raise ValueError(f"projection_input must be features or embedding, got {projection_input!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.projection_input = projection_input
        self.supervised = bool(supervised)
        self.projection = ProjectionHead(feature_channels, projection_dim, projection_hidden)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projection = copy.deepcopy(self.projection)
        for parameter in self.momentum_parameters():
            parameter.requires_grad_(False)
        # Random unit vectors until real keys replace them (as in MoCo).
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # How many real keys have been enqueued so far (diagnostic; saturates at K).
        self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------------------------------
    def momentum_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.momentum_encoder.parameters()
        yield from self.momentum_projection.parameters()

    def trainable_parameters(self) -> list:
        """The online projection head's parameters (the online network's belong to its owner)."""
        return list(self.projection.parameters())

    @torch.no_grad()
    def momentum_update(self, encoder: nn.Module) -> None:
        """EMA of the online network and projection: ``key = m * key + (1 - m) * online``.

        Buffers (e.g. batch-norm running statistics) are copied.
        """
        online = comm.unwrap_model(encoder)
        pairs = [(online, self.momentum_encoder), (self.projection, self.momentum_projection)]
        for source, target in pairs:
            for param_q, param_k in zip(source.parameters(), target.parameters()):
                param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)
            for buffer_q, buffer_k in zip(source.buffers(), target.buffers()):
                buffer_k.copy_(buffer_q)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Writes ``(M, D)`` keys (gathered over ranks) at the pointer, wrapping around the queue."""
        keys = concat_all_gather(keys.detach().to(self.queue.dtype))  # (world*M, D)
        size = self.queue.shape[0]
        if keys.shape[0] >= size:  # more keys than slots: keep the newest K
            keys = keys[-size:]
        count = keys.shape[0]
        pointer = int(self.queue_ptr)
        index = (pointer + torch.arange(count, device=self.queue.device)) % size
        self.queue[index] = keys
        self.queue_ptr[0] = (pointer + count) % size
        self.queue_filled[0] = min(int(self.queue_filled) + count, size)

    # ------------------------------------------------------------------------------------------
    def source_map(self, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``(B, C, Z, Y, X)`` map that the projection head reads, from a network's outputs.

        "features" needs the outputs of ``UNet3D.forward(x, return_features=True)``.
        """
        if self.projection_input == "embedding":
            return outputs["embedding"]
        if "features" not in outputs:
            raise ValueError("MoCo on decoder features needs the network's outputs with return_features=True")
        return outputs["features"]

    def encode_queries(
        self,
        source: torch.Tensor,
        coords: torch.Tensor,
        projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Normalised online projections ``(B*N, D)`` of the ``(B, C, Z, Y, X)`` map ``source`` of
        view 1 at ``coords`` ``(B, N, 3)``; ``projection`` replaces the head (e.g. its DDP wrapper)."""
        vectors = gather_voxels(source.float(), coords)  # (B*N, C)
        project = projection if projection is not None else self.projection
        return F.normalize(project(vectors), dim=1)

    @torch.no_grad()
    def encode_keys(self, view: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Normalised momentum projections ``(B*N, D)`` at ``coords`` ``(B, N, 3)`` of ``view``.

        ``view`` is ``(B, 1, Z, Y, X)``; no gradient flows into the momentum network.
        """
        self.momentum_encoder.train(self.training)
        if self.projection_input == "features":
            source = self.momentum_encoder.forward_features(view)
        else:
            source = self.momentum_encoder(view)["embedding"]
        vectors = gather_voxels(source.float(), coords)  # (B*N, C)
        return F.normalize(self.momentum_projection(vectors), dim=1)

    def contrast(
        self, query: torch.Tensor, key: torch.Tensor, groups: torch.Tensor | None = None
    ) -> tuple:
        """InfoNCE of queries against keys and the queue, then enqueue the keys.

        Args:
            query: ``(M, D)``; key: ``(M, D)``; groups: ``(M,)`` instance groups (supervised only).

        Returns:
            (loss scalar, diagnostics dict of detached scalars: accuracy, positive similarity,
            key std and key std * sqrt(D), 1 = spread keys, 0 = collapse).
        """
        queue = self.queue.clone().detach()  # (K, D); the enqueue below must not alter the graph
        if self.supervised and groups is not None:
            loss, logits = supervised_info_nce(query, key, groups, queue, self.temperature)
            positive_logit = logits.gather(1, torch.arange(len(key), device=logits.device)[:, None])
            negative_logits = logits[:, key.shape[0]:]
        else:
            loss, logits = info_nce(query, key, queue, self.temperature)
            positive_logit, negative_logits = logits[:, :1], logits[:, 1:]
        with torch.no_grad():
            accuracy = (positive_logit > negative_logits.max(dim=1, keepdim=True).values).float().mean()
            spread = key_std(key)
            terms = {
                "moco_accuracy": accuracy,
                "moco_positive_similarity": (query * key).sum(dim=1).mean().detach(),
                "moco_key_std": spread,
                "moco_key_std_ratio": spread * math.sqrt(key.shape[1]),
            }
        self.dequeue_and_enqueue(key)
        return loss, terms

    def forward(
        self,
        source: torch.Tensor,
        view2: torch.Tensor,
        coords1: torch.Tensor,
        coords2: torch.Tensor,
        groups: torch.Tensor | None = None,
        projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple:
        """One contrastive step after the online network's pass over view 1: queries, keys,
        InfoNCE (in float32, outside any autocast), enqueue.

        Call :meth:`momentum_update` first (once per step).

        Args:
            source: ``(B, C, Z, Y, X)`` online map of view 1 (:meth:`source_map` of the outputs).
            view2: ``(B, 1, Z, Y, X)`` second views (through the momentum network).
            coords1, coords2: ``(B, N, 3)`` corresponding voxel coordinates in each view.
            groups: ``(B*N,)`` instance groups for supervised contrast, or None.
            projection: the online head to use instead of ``self.projection`` (its DDP wrapper).

        Returns:
            (loss, diagnostics) as :meth:`contrast`.
        """
        query = self.encode_queries(source, coords1, projection)
        key = self.encode_keys(view2, coords2)
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self.contrast(query.float(), key.float(), groups)
