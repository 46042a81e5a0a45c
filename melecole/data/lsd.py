"""Local shape descriptors (Sheridan et al. 2022, Nature Methods 20) as an auxiliary training target.

For a voxel p of object l and a box window W(p) of radius r = (rz, ry, rx) around it, the descriptor
summarises the part of l inside the window, S = {q in W(p) : label(q) = l}:

- size:       |S| / |W|                                          (1 channel, in [0, 1])
- offset:     (mean(S) - p) / r per axis, mapped to [0, 1]       (3 channels: z, y, x)
- variance:   var(S) along each axis / v, v = r (r + 1) / 3      (3 channels: zz, yy, xx, in [0, 1])
- covariance: cov(S) of each axis pair / sqrt(v_a v_b), to [0, 1] (3 channels: zy, zx, yx)

v is the variance of a full window along that axis, so a window filled by the object reads 1 and a
thin neurite across it reads near 0 on the other axes. The window moments are box filters of the
object's mask times 1, z, y, x, z^2, ... (``scipy.ndimage.uniform_filter1d``, linear in the voxels
whatever the radius), evaluated per object inside its bounding box grown by r. The published LSDs
use a Gaussian window; a box has the same moments' meaning at a fraction of the cost, which is what
lets the loader compute them per augmented patch on a CPU. The ``lsds`` package was not used: it
imports gunpowder at load time and builds a Cython extension (docs/ARCHITECTURE.md, "Training").

Voxels with label 0 get 0 in every channel; the loss ignores them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from melecole.models.unet3d import LSD_CHANNELS

__all__ = ["LSD_CHANNELS", "local_shape_descriptors"]

_PAIRS = ((0, 1), (0, 2), (1, 2))


def _window_moments(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Box-window means of mask * (1, z, y, x, z^2, y^2, x^2, zy, zx, yx): (10, Z, Y, X) float32.

    Coordinates are the box's own voxel indices (small numbers: the second moments keep their
    precision). Outside the box counts as background (mode "constant").
    """
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in mask.shape), indexing="ij")
    weight = mask.astype(np.float32)
    channels = [weight] + [weight * g for g in grids]
    channels += [channels[1 + a] * grids[a] for a in range(3)]
    channels += [channels[1 + a] * grids[b] for a, b in _PAIRS]
    stack = np.stack(channels)
    for axis, r in enumerate(radius):
        stack = ndimage.uniform_filter1d(stack, 2 * int(r) + 1, axis=axis + 1, mode="constant")
    return stack


def local_shape_descriptors(labels: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """The 10-channel descriptor of every labelled voxel of ``labels`` (see the module docstring).

    Args:
        labels: (Z, Y, X) non-negative integer ids; 0 is background / unlabelled.
        radius: (rz, ry, rx) >= 1, the half-size of the window in voxels.

    Returns:
        (10, Z, Y, X) float32 in [0, 1]; 0 where ``labels`` is 0.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    radius = tuple(int(r) for r in radius)
    if len(radius) != 3 or min(radius) < 1:
        raise ValueError(f"radius must be 3 integers >= 1 (z, y, x), got {list(radius)}")
    out = np.zeros((LSD_CHANNELS,) + labels.shape, dtype=np.float32)
    if not labels.any():
        return out
    ids, inverse = np.unique(labels, return_inverse=True)
    dense = inverse.reshape(labels.shape).astype(np.int64) + (0 if ids[0] == 0 else 1)
    full_variance = np.array([r * (r + 1) / 3.0 for r in radius])
    for index, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is None:
            continue
        context = tuple(
            slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(box, radius, labels.shape)
        )
        mask = dense[context] == index
        moments = _window_moments(mask, radius)[:, mask]  # (10, voxels of this object)
        coords = np.nonzero(mask)
        mass = moments[0]
        mean = moments[1:4] / mass
        second = moments[4:7] / mass - mean**2
        cross = np.stack([moments[7 + k] / mass - mean[a] * mean[b] for k, (a, b) in enumerate(_PAIRS)])
        descriptor = np.empty_like(moments)
        descriptor[0] = mass
        for axis in range(3):
            descriptor[1 + axis] = 0.5 + 0.5 * (mean[axis] - coords[axis]) / radius[axis]
            descriptor[4 + axis] = second[axis] / full_variance[axis]
        for k, (a, b) in enumerate(_PAIRS):
            descriptor[7 + k] = 0.5 + 0.5 * cross[k] / np.sqrt(full_variance[a] * full_variance[b])
        target = out[(slice(None),) + context]
        target[:, mask] = np.clip(descriptor, 0.0, 1.0)
    return out
