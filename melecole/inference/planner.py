"""Window planning: the sliding-window geometry of a prediction from the volume, the model and memory.

A model computes a window of voxels at a cost that falls per voxel as the window grows (bare forward
of the fib-gala UNet on 2 CPU cores: 0.19 Mvoxel/s at 24x64x64, 0.57 at 24x128x128, 0.63 at
32x256x256), and every voxel that two windows share is computed twice. The planner therefore picks,
among the windows the model accepts (multiples of its downsampling) and the memory budget allows,
the one that minimises ``windows x (window voxels + WINDOW_OVERHEAD_VOXELS)`` for the volume at hand:

- the window is never larger than the volume rounded up to the model's factors (a small volume is
  one window along that axis, padded by fewer voxels than one factor);
- consecutive windows share at least the required overlap (INFERENCE.OVERLAP, raised to
  2 x margin + the largest |offset| so that every affinity pair lies inside one cropped window);
- the windows are spread evenly (the stride is the smallest one that needs no more windows), so the
  last window is not a near-duplicate of the one before.

Two modes: :func:`plan_windows` for a whole volume of known shape (``PredictOptions.plan_for``), and
:func:`plan_block_windows`, a fixed-stride plan for block-by-block prediction (the blocks of
``infer.py --affinities-only`` and blockwise runs must all lie on one window grid for their exact
halo, :func:`melecole.inference.chunked.exact_halo`), which also counts the halo's cost.

Explicit windows (INFERENCE.WINDOW_SIZE as 3 numbers) and strides are kept as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from melecole.errors import ConfigError

__all__ = [
    "WindowRequest",
    "WindowPlan",
    "WINDOW_OVERHEAD_VOXELS",
    "NOMINAL_BLOCK",
    "DEFAULT_OVERLAP",
    "activation_bytes_per_voxel",
    "required_overlap",
    "spread_stride",
    "window_count",
    "plan_windows",
    "plan_block_windows",
]

Triplet = tuple[int, int, int]

# Per-window cost of a forward pass in voxel units: time(window) ~ voxels + this (fitted to the bare
# forward times of bench/bench_predict.py; small windows are much less efficient per voxel).
WINDOW_OVERHEAD_VOXELS = 150_000
# The block a shape-free plan (block-by-block prediction) is made for: chunked.DEFAULT_CHUNK.
NOMINAL_BLOCK: Triplet = (32, 256, 256)
# Overlap (z, y, x voxels) of windows when INFERENCE.WINDOW_SIZE is auto and INFERENCE.OVERLAP is
# empty, from the border effect measured by bench/bench_predict.py (beyond 2 x margin + offsets).
DEFAULT_OVERLAP: tuple[float, float, float] = (4, 16, 16)
# Largest automatic INFERENCE.BATCH_SIZE.
MAX_AUTO_BATCH = 8


@dataclass(frozen=True)
class WindowRequest:
    """What the config asks for (INFERENCE.WINDOW_SIZE / STRIDE / OVERLAP / MARGIN / BATCH_SIZE).

    Attributes:
        window: explicit window (z, y, x), or None = auto.
        stride: explicit stride (only with an explicit window), or None.
        overlap: per axis a fraction of the window (< 1) or voxels (whole numbers >= 1); None = the
            old default (half the window) for an explicit window, :data:`DEFAULT_OVERLAP` for auto.
        margin: voxels cropped from each window side (INFERENCE.MARGIN).
        reach: largest |offset| per axis.
        factors: the model's downsampling: window sizes must be multiples.
        batch_size: windows per forward pass; 0 = as many as the memory budget allows (at most 8).
        memory_budget: bytes one batch of windows may take.
        bytes_per_voxel: estimated bytes per window voxel (:func:`activation_bytes_per_voxel`).
        square_yx: the window needs equal y and x (TTA with the y-x transpose).
        output_bytes_per_voxel: bytes per voxel of the predictor's outputs (C + 1 float32); a
            block plan keeps one padded block's outputs and one batch within the budget.
    """

    window: Triplet | None
    stride: Triplet | None
    overlap: tuple[float, float, float] | None
    margin: Triplet
    reach: Triplet
    factors: Triplet
    batch_size: int
    memory_budget: float
    bytes_per_voxel: float
    square_yx: bool = False
    output_bytes_per_voxel: float = 0.0


@dataclass(frozen=True)
class WindowPlan:
    """A concrete geometry: window, stride, batch and the number of windows per axis."""

    window: Triplet
    stride: Triplet
    batch_size: int
    counts: Triplet

    @property
    def windows(self) -> int:
        return int(np.prod(self.counts))

    @property
    def computed_voxels(self) -> int:
        """Voxels the model computes (every window once, without TTA)."""
        return self.windows * int(np.prod(self.window))


def activation_bytes_per_voxel(
    filters: Sequence[int],
    pool_z: Sequence[bool],
    embedding_dim: int,
    channels: int,
    variants: int = 1,
    concurrent: int = 1,
) -> float:
    """Estimated peak bytes per window voxel of a forward pass plus the window's affinities.

    float32: about 4 full-resolution feature maps of the first level, 3 per deeper level (skips and
    the block's working tensors, scaled by the level's downsampling), embeddings and foreground, and
    the affinities twice (per variant and accumulated over TTA variants). ``concurrent`` forward
    passes at once (the OpenVINO backend runs up to min(TTA variants, threads) variants together)
    multiply the forward's part. Measured peak RSS on CPU (bench/bench_predict.py --memory) lies below
    this for the shipped models.
    """
    forward = 4.0 * filters[0] + 4.0
    scale = 1.0
    for level, channels_at_level in enumerate(filters[1:]):
        scale *= (2 if pool_z[level] else 1) * 4
        forward += 3.0 * channels_at_level / scale
    forward += 2.0 * (embedding_dim + 1)
    floats = max(1, int(concurrent)) * forward + 2.0 * channels * (2 if variants > 1 else 1)
    return 4.0 * floats


def required_overlap(
    window: Sequence[int], overlap: Sequence[float] | None, margin: Sequence[int], reach: Sequence[int]
) -> list[int]:
    """Voxels consecutive windows must share per axis: the requested overlap (fraction of the
    window or voxels), at least 2 x margin + reach (every pair inside one cropped window)."""
    spec = DEFAULT_OVERLAP if overlap is None else overlap
    wanted = [int(v) if v >= 1 else math.ceil(float(v) * w) for v, w in zip(spec, window)]
    return [max(v, 2 * m + r) for v, m, r in zip(wanted, margin, reach)]


def window_count(size: int, window: int, stride: int) -> int:
    """Windows along an axis of ``size`` (>= window): starts 0, stride, ... and one aligned to the end
    (as :func:`melecole.inference.sliding_window.window_starts`)."""
    span = size - window
    return span // stride + 1 + (1 if span % stride else 0)


def spread_stride(size: int, window: int, max_stride: int) -> int:
    """The stride that spreads windows evenly: as few windows as ``max_stride`` allows, the gaps
    between starts as equal as integers let them be (the last start is aligned to the end)."""
    span = max(0, size - window)
    if span == 0:
        return max(1, min(window, max_stride))
    gaps = math.ceil(span / max_stride)
    return math.ceil(span / gaps)


def _axis_candidates(request: WindowRequest, axis: int, cap: int) -> list[int]:
    """Window sizes the model accepts along ``axis``, from ``cap`` (rounded up to the factor) down."""
    factor, margin = request.factors[axis], request.margin[axis]
    if request.window is not None:
        return [int(request.window[axis])]
    # At least the smallest accepted window wider than both margins (a tiny axis is padded to it).
    top = max(math.ceil(cap / factor) * factor, (2 * margin // factor + 1) * factor)
    return [w for w in range(top, 0, -factor) if w > 2 * margin]


def _volume_axis(request: WindowRequest, axis: int, size: int) -> list[tuple[int, int, int]]:
    """(window, stride, count) per candidate window along one axis of a whole volume."""
    rows = []
    for window in _axis_candidates(request, axis, size):
        padded = max(size, window)
        overlap = required_overlap([window] * 3, request.overlap, request.margin, request.reach)[axis]
        stride = _fixed_stride(request, axis, window, overlap)
        if stride is None:
            if padded > window and window - overlap < 1:
                continue
            stride = spread_stride(padded, window, max(1, window - overlap))
        rows.append((window, stride, window_count(padded, window, stride)))
    return _smallest_per_count(rows)


def _smallest_per_count(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Of candidates with the same number of windows only the smallest window (it computes fewer
    voxels in less memory), largest first; keeps the search small on large volumes."""
    best: dict[int, tuple[int, int, int]] = {}
    for row in rows:
        if row[2] not in best or row[0] < best[row[2]][0]:
            best[row[2]] = row
    return sorted(best.values(), reverse=True)


def _fixed_stride(request: WindowRequest, axis: int, window: int, overlap: int) -> int | None:
    """The stride an explicit request fixes: INFERENCE.STRIDE, or with an explicit window and no
    INFERENCE.OVERLAP the old default (half the window, lowered to window - 2 margin - reach);
    None when the stride follows the overlap."""
    if request.stride is not None:
        return int(request.stride[axis])
    if request.window is not None and request.overlap is None:
        return max(1, min(window // 2, window - 2 * request.margin[axis] - request.reach[axis]))
    return None


def _outer(per_axis: list[np.ndarray]) -> np.ndarray:
    """(Z, Y, X) products of three 1D arrays."""
    return per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]


def _choose(
    request: WindowRequest,
    axes: list[list[tuple[int, int, int]]],
    useful: list[np.ndarray] | None = None,
    padded: list[np.ndarray] | None = None,
) -> tuple[Triplet, Triplet, Triplet]:
    """The candidate (window, stride, count) triple of lowest cost that fits the memory budget.

    Block mode (``useful``, ``padded``: per candidate the rounded block and the padded block per
    axis): the cost is per useful voxel, and the padded block's outputs share the budget."""
    if any(not rows for rows in axes):
        axis = next(a for a, rows in enumerate(axes) if not rows)
        raise ConfigError(
            f"INFERENCE.OVERLAP/INFERENCE.MARGIN: no window along {'zyx'[axis]} leaves a stride >= 1 "
            f"(margin {request.margin[axis]}, largest offset {request.reach[axis]})"
        )
    window = [np.array([row[0] for row in rows], dtype=np.float64) for rows in axes]
    count = [np.array([row[2] for row in rows], dtype=np.float64) for rows in axes]
    voxels = _outer(window)
    cost = _outer(count) * (voxels + WINDOW_OVERHEAD_VOXELS)
    fits = voxels * request.bytes_per_voxel <= request.memory_budget
    if useful is not None and padded is not None:
        cost = cost / _outer(useful)
        # The padded block's outputs share the budget when some window allows it.
        with_outputs = fits & (voxels * request.bytes_per_voxel + _outer(padded) * request.output_bytes_per_voxel
                               <= request.memory_budget)  # fmt: skip
        fits = with_outputs if with_outputs.any() else fits
    if request.window is not None:
        fits[...] = True  # an explicit window is the user's choice; only the batch follows the budget
    if request.square_yx:
        fits &= window[1][None, :, None] == window[2][None, None, :]
    if not fits.any():
        smallest = float(voxels.min()) * request.bytes_per_voxel / 1e9
        raise ConfigError(
            f"INFERENCE.MEMORY_BUDGET_GB: {request.memory_budget / 1e9:g} GB holds no window the model "
            f"accepts (the smallest needs about {smallest:.3g} GB); expected a larger budget"
        )
    # Lowest cost; among equal costs the first, i.e. the largest window (candidates run large to small).
    index = np.unravel_index(int(np.argmin(np.where(fits, cost, np.inf))), cost.shape)
    rows = [axes[a][int(index[a])] for a in range(3)]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows)  # type: ignore[return-value]


def _batch(request: WindowRequest, window: Sequence[int], windows: int, budget: float | None = None) -> int:
    """INFERENCE.BATCH_SIZE, or (0 = auto) as many windows as the budget holds, at most 8 and the count."""
    if request.batch_size > 0:
        return int(request.batch_size)
    per_window = float(np.prod(window)) * request.bytes_per_voxel
    budget = request.memory_budget if budget is None else budget
    return int(max(1, min(MAX_AUTO_BATCH, windows, budget // per_window)))


def plan_windows(request: WindowRequest, shape: Sequence[int]) -> WindowPlan:
    """The plan for one whole volume of ``shape`` (z, y, x): evenly spread windows.

    Raises:
        ConfigError: no accepted window fits the memory budget, or the overlap leaves no stride.
    """
    axes = [_volume_axis(request, axis, int(size)) for axis, size in enumerate(shape)]
    window, stride, counts = _choose(request, axes)
    windows = int(np.prod(counts))
    return WindowPlan(window, stride, _batch(request, window, windows), counts)


def plan_block_windows(request: WindowRequest, block: Sequence[int] = NOMINAL_BLOCK) -> WindowPlan:
    """A fixed-stride plan for block-by-block prediction with the exact halo (window rounded up to
    the stride): the cost counts the windows of a padded block per block voxel.

    ``counts`` are the windows of one padded block (block rounded up to the stride, plus two halos).
    """
    axes, useful, padded = [], [], []
    for axis, size in enumerate(block):
        rows, per_axis, padded_axis = [], [], []
        for window in _axis_candidates(request, axis, max(1, int(size) // 2)):
            overlap = required_overlap([window] * 3, request.overlap, request.margin, request.reach)[axis]
            stride = _fixed_stride(request, axis, window, overlap)
            if stride is None:
                if window - overlap < 1:
                    continue
                stride = window - overlap
            ((rounded, halo),) = _block_extent([size], [window], [stride])
            rows.append((window, stride, window_count(rounded + 2 * halo, window, stride)))
            per_axis.append(rounded)
            padded_axis.append(rounded + 2 * halo)
        axes.append(rows)
        useful.append(np.array(per_axis, dtype=np.float64))
        padded.append(np.array(padded_axis, dtype=np.float64))
    window, stride, counts = _choose(request, axes, useful, padded)
    outputs = float(np.prod([r[0] + 2 * r[1] for r in _block_extent(block, window, stride)]))
    left = request.memory_budget - outputs * request.output_bytes_per_voxel
    return WindowPlan(window, stride, _batch(request, window, int(np.prod(counts)), left), counts)


def _block_extent(block: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """(block rounded up to the stride, exact halo) per axis."""
    return [
        (math.ceil(int(b) / s) * s, math.ceil(int(w) / s) * s) for b, w, s in zip(block, window, stride)
    ]
