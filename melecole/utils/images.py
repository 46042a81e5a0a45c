"""Small image helpers for TensorBoard and reports (numpy in, uint8 RGB out)."""

from __future__ import annotations

import numpy as np
import torch


def embedding_pca_image(embedding: torch.Tensor | np.ndarray) -> np.ndarray:
    """(E, Y, X) embedding -> (Y, X, 3) uint8 image of its first three principal components."""
    values = torch.as_tensor(embedding, dtype=torch.float32)
    channels, height, width = values.shape
    flat = values.reshape(channels, -1).T  # (N, E)
    flat = flat - flat.mean(dim=0, keepdim=True)
    components = min(3, channels)
    # right singular vectors are the principal axes; fine for a few thousand pixels
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ vh[:components].T  # (N, components)
    if components < 3:
        projected = torch.cat([projected, projected.new_zeros(projected.shape[0], 3 - components)], dim=1)
    low = projected.quantile(0.01, dim=0)
    high = projected.quantile(0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    return (scaled.reshape(height, width, 3).numpy() * 255).astype(np.uint8)


def label_image(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(Y, X) integer labels -> (Y, X, 3) uint8 with a random colour per id and black for 0."""
    ids, inverse = np.unique(labels, return_inverse=True)
    colours = np.random.default_rng(seed).integers(40, 256, size=(len(ids), 3), dtype=np.uint8)
    colours[ids == 0] = 0
    return colours[inverse.reshape(labels.shape)]
