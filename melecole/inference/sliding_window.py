"""Sliding-window prediction: overlapping windows -> per-window affinities -> blended volume.

Each window's embeddings give affinities inside that window only (docs/ARCHITECTURE.md: embeddings of two
windows need not share a frame). A window contributes the affinity of the pair (p, p + o) only if
both voxels lie in its *cropped* region: the window minus ``margin`` voxels on each side, except on
sides that touch the volume border. Contributions are blended with a separable weight profile
(gaussian | bump | constant): weighted sums are accumulated and divided by the weight sums at the
end. Window positions form a grid and every per-window weight is a product of per-axis factors, so
the weight sums are products of three 1D arrays and never need a volume-sized array.

Memory: the outputs (C + 1 volume-sized float32 arrays), plus one batch of windows on the device;
windows are streamed (predicted, accumulated, discarded).
"""

from __future__ import annotations

import itertools
import operator
from typing import Literal, Sequence

import numpy as np
import torch

from melecole.inference.affinities import INVALID_AFFINITY
from melecole.inference.backends import build_backend
from melecole.inference.options import default_stride
from melecole.inference.tta import IDENTITY, TTAVariant, window_affinities
from melecole.utils.offsets import Offsets, check_offsets
from melecole.utils.progress import progress_bar

# _normalise leaves pairs without weight at 0.
assert INVALID_AFFINITY == 0.0

__all__ = ["predict_volume", "window_starts", "blending_profile", "BLENDING_CHOICES"]

BLENDING_CHOICES = ("gaussian", "bump", "constant")
Blending = Literal["gaussian", "bump", "constant"]
# Profiles are floored so that voxels seen only near window edges still get a positive weight.
_PROFILE_FLOOR = 1e-3


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window start positions along one axis: 0, stride, 2 stride, ..., the last one aligned to the end.

    ``size`` must be >= ``window`` (pad smaller volumes first).
    """
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}; pad it first")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blending_profile(length: int, blending: Blending) -> np.ndarray:
    """float64 (length,) weight profile along one window axis, in (0, 1], maximal at the centre.

    gaussian: sigma = length / 8; bump: exp(1 - 1 / (1 - r^2)) with r in (-1, 1) from edge to edge;
    constant: ones. Values are floored at 1e-3.
    """
    if blending not in BLENDING_CHOICES:
        raise ValueError(f"blending must be one of {', '.join(BLENDING_CHOICES)}; got {blending!r}")
    if blending == "constant" or length == 1:
        return np.ones(length)
    position = np.arange(length) - (length - 1) / 2.0
    if blending == "gaussian":
        profile = np.exp(-0.5 * (position / (length / 8.0)) ** 2)
    else:
        radius = position / (length / 2.0)
        profile = np.exp(1.0 - 1.0 / (1.0 - radius**2))
    return np.maximum(profile, _PROFILE_FLOOR)


class _AxisPlan:
    """Per-axis geometry: window starts, crop bounds and 1D weights per channel.

    Weights of a window along this axis, for channel c at window-local index i:
    ``profile[i] * [lo <= i < hi] * [lo <= i + o_c < hi]`` ([lo, hi) = the cropped region); the
    foreground uses ``profile[i] * [lo <= i < hi]``. Summed over windows they give the 1D weight
    sums whose outer products normalise the accumulated volume.
    """

    def __init__(
        self,
        axis: str,
        size: int,
        window: int,
        stride: int,
        margin: int,
        out_begin: int,
        out_size: int,
        axis_offsets: Sequence[int],
        profile: np.ndarray,
    ):
        self.axis = axis
        self.window, self.stride = window, stride
        self.starts = window_starts(size, window, stride)
        # The output covers [out_begin, out_begin + out_size) of the (padded) input axis.
        self.out_begin, self.out_size = out_begin, out_size
        self.offsets = list(axis_offsets)
        self.profile = profile
        self.margin = margin
        self.size = size
        # 1D weight sums over windows, in padded coordinates: (C, size) and (size,).
        self.affinity_sums = np.zeros((len(self.offsets), size))
        self.foreground_sums = np.zeros(size)
        for start in self.starts:
            lo, hi = self.crop(start)
            affinity, foreground = self.weights(lo, hi)
            self.affinity_sums[:, start : start + window] += affinity
            self.foreground_sums[start : start + window] += foreground

    def crop(self, start: int) -> tuple[int, int]:
        """Window-local cropped region [lo, hi): no margin on sides that touch the volume border."""
        lo = 0 if start == 0 else self.margin
        hi = self.window if start + self.window == self.size else self.window - self.margin
        return lo, hi

    def output_span(self, start: int) -> tuple[int, int]:
        """[begin, end) in input coordinates where the window's cropped region meets the output."""
        lo, hi = self.crop(start)
        return max(start + lo, self.out_begin), min(start + hi, self.out_begin + self.out_size)

    def weights(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, window) affinity weights and (window,) foreground weights of a window cropped to [lo, hi)."""
        index = np.arange(self.window)
        inside = (index >= lo) & (index < hi)
        foreground = self.profile * inside
        affinity = np.stack([foreground * ((index + step >= lo) & (index + step < hi)) for step in self.offsets])
        return affinity, foreground

    def inverse_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """1 / weight sums on the output axis: (C, out_size) and (out_size,).

        Zero where the pair leaves the output region. Raises ValueError where a valid pair is
        covered by no window (stride too large for the margin and offsets).
        """
        region = slice(self.out_begin, self.out_begin + self.out_size)
        sums = self.affinity_sums[:, region]
        index = np.arange(self.out_size)
        inverse = np.zeros_like(sums)
        for channel, step in enumerate(self.offsets):
            valid = (index + step >= 0) & (index + step < self.out_size)
            if np.any(sums[channel][valid] <= 0):
                raise ValueError(
                    f"along {self.axis}: window {self.window}, stride {self.stride}, margin {self.margin} "
                    f"leave "
                    f"pairs at offset {step} covered by no window (both voxels must lie in one cropped "
                    f"window); use a stride <= window - 2 * margin - |offset| = "
                    f"{self.window - 2 * self.margin - abs(step)}"
                )
            inverse[channel][valid] = 1.0 / sums[channel][valid]
        foreground = self.foreground_sums[region]
        return inverse, 1.0 / foreground


def _pad_to_window(raw: np.ndarray, window: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Reflect-pads axes shorter than the window (split evenly before/after); returns (array, pad_before)."""
    pad_width = []
    for size, length in zip(raw.shape, window):
        total = max(0, length - size)
        pad_width.append((total // 2, total - total // 2))
    if any(total for pair in pad_width for total in pair):
        raw = np.pad(raw, pad_width, mode="reflect")
    return raw, [before for before, _ in pad_width]


def _region_bounds(region: Sequence[slice] | None, shape: Sequence[int]) -> list[tuple[int, int]]:
    """[(begin, end)] per axis of a region of ``shape`` (None = all); ValueError if empty or strided."""
    if region is None:
        return [(0, int(size)) for size in shape]
    if len(region) != len(shape):
        raise ValueError(f"region needs {len(shape)} slices, got {region!r}")
    bounds = []
    for piece, size in zip(region, shape):
        begin, end, step = piece.indices(int(size))
        if step != 1 or end <= begin:
            raise ValueError(f"region {region!r} must be non-empty slices with step 1 inside shape {tuple(shape)}")
        bounds.append((begin, end))
    return bounds


def _to_unit_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255 on the device (only bytes travel there); floats are already in [0, 1]."""
    if batch.dtype == torch.uint8:
        return batch.float().mul_(1.0 / 255.0)
    return batch.float()


def _check_geometry(
    raw: np.ndarray,
    window: Sequence[int],
    stride: Sequence[int] | None,
    margin: Sequence[int],
    offsets: Offsets,
) -> tuple[list[int], list[int], list[int], list[tuple[int, ...]]]:
    """Checked (window, stride, margin, offsets); ValueError names what is wrong."""
    if raw.ndim != 3:
        raise ValueError(f"raw must be (Z, Y, X), got shape {raw.shape}")
    if raw.dtype != np.uint8 and not np.issubdtype(raw.dtype, np.floating):
        raise ValueError(f"raw must be uint8 or float in [0, 1] (see melecole.io.model_input), got {raw.dtype}")
    offsets = check_offsets(offsets, 3)
    window = [int(w) for w in window]
    margin = [int(m) for m in margin]
    stride = [int(s) for s in stride] if stride else default_stride(window, margin, offsets)
    if len(window) != 3 or len(stride) != 3 or len(margin) != 3:
        raise ValueError(f"window, stride and margin need 3 values (z, y, x); got {window}, {stride}, {margin}")
    for w, s, m in zip(window, stride, margin):
        if w < 1 or not 1 <= s <= w or m < 0 or 2 * m >= w:
            raise ValueError(
                f"need 1 <= stride <= window and 0 <= 2 * margin < window; got window {window}, "
                f"stride {stride}, margin {margin}"
            )
    return window, stride, margin, offsets


class _WindowGrid:
    """The plan of one prediction: padded input, window positions, blending weights, output buffers.

    Accumulates each window's weighted, cropped affinities and foreground into float32 outputs and
    normalises them at the end (:meth:`finish`).
    """

    def __init__(
        self,
        raw: np.ndarray,
        window: list[int],
        stride: list[int],
        margin: list[int],
        offsets: list[tuple[int, ...]],
        blending: Blending,
        region: Sequence[slice] | None,
        device: torch.device,
    ):
        bounds = _region_bounds(region, raw.shape)
        self.shape = tuple(end - begin for begin, end in bounds)
        self.padded, pad_before = _pad_to_window(raw, window)
        self.window, self.offsets, self.device = window, offsets, device
        self.plans = [
            _AxisPlan(
                "zyx"[a],
                self.padded.shape[a],
                window[a],
                stride[a],
                margin[a],
                pad_before[a] + bounds[a][0],
                self.shape[a],
                [o[a] for o in offsets],
                blending_profile(window[a], blending),
            )
            for a in range(3)
        ]
        self.inverse = [plan.inverse_sums() for plan in self.plans]  # checks coverage before any compute
        # Windows whose cropped part misses the output region (e.g. inside padding) add nothing.
        useful = [[s for s in plan.starts if operator.lt(*plan.output_span(s))] for plan in self.plans]
        self.positions = list(itertools.product(*useful))
        self.affinities = np.zeros((len(offsets),) + self.shape, dtype=np.float32)
        self.foreground = np.zeros(self.shape, dtype=np.float32)
        self._weights: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def crops(self, positions: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """(B, 1, wz, wy, wx) model input of the windows at ``positions``, on the device."""
        wz, wy, wx = self.window
        crops = np.stack([self.padded[z : z + wz, y : y + wy, x : x + wx] for z, y, x in positions])
        return _to_unit_float(torch.from_numpy(crops).to(self.device, non_blocking=True))[:, None]

    def _axis_weights(self, axis: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (axis, lo, hi)
        if key not in self._weights:
            affinity, foreground = self.plans[axis].weights(lo, hi)
            self._weights[key] = (
                torch.as_tensor(affinity[:, lo:hi], dtype=torch.float32, device=self.device),
                torch.as_tensor(foreground[lo:hi], dtype=torch.float32, device=self.device),
            )
        return self._weights[key]

    def accumulate(
        self, window_affinities: torch.Tensor, window_foreground: torch.Tensor, start: Sequence[int]
    ) -> None:
        """Adds one window's weighted, cropped (C, wz, wy, wx) affinities and (wz, wy, wx) foreground."""
        local, target, weights = [], [], []
        for axis, plan in enumerate(self.plans):
            begin, end = plan.output_span(start[axis])
            lo, hi = plan.crop(start[axis])
            affinity_weight, foreground_weight = self._axis_weights(axis, lo, hi)
            cut = slice(begin - start[axis] - lo, end - start[axis] - lo)
            local.append(slice(begin - start[axis], end - start[axis]))
            target.append(slice(begin - plan.out_begin, end - plan.out_begin))
            weights.append((affinity_weight[:, cut], foreground_weight[cut]))
        (az, fz), (ay, fy), (ax, fx) = weights
        local, target = tuple(local), tuple(target)
        # The separable weight is applied as two factors, (C, z, y, 1) and (C, 1, 1, x), in place on the
        # window's own tensors: no (C, z, y, x) weight or product is allocated.
        values = window_affinities[(slice(None),) + local].mul_(ax[:, None, None, :])
        affinity_weight = az[:, :, None, None] * ay[:, None, :, None]
        fg_values = window_foreground[local].mul_(fx[None, None, :])
        foreground_weight = fz[:, None] * fy[None, :]
        if values.device.type == "cpu":  # torch's threads add into the numpy sums through shared memory
            torch.from_numpy(self.affinities)[(slice(None),) + target].addcmul_(values, affinity_weight)
            torch.from_numpy(self.foreground)[target].addcmul_(fg_values, foreground_weight[:, :, None])
        else:
            self.affinities[(slice(None),) + target] += values.mul_(affinity_weight).cpu().numpy()
            self.foreground[target] += fg_values.mul_(foreground_weight[:, :, None]).cpu().numpy()

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Divides the weighted sums by the weight sums (in place); returns (affinities, foreground)."""
        _normalise(self.affinities, self.foreground, self.inverse, self.offsets)
        return self.affinities, self.foreground


def predict_volume(
    model: torch.nn.Module,
    raw: np.ndarray,
    *,
    window: Sequence[int],
    stride: Sequence[int] | None = None,
    margin: Sequence[int] = (0, 0, 0),
    offsets: Offsets,
    delta_d: float,
    norm: Literal["l1", "l2"] = "l2",
    blending: Blending = "gaussian",
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp: bool = True,
    progress: bool = True,
    region: Sequence[slice] | None = None,
    tta: Sequence[TTAVariant] | None = None,
    backend: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """Blended affinities and foreground probability of a volume (or of a region of it).

    Args:
        model: forward(x (B, 1, z, y, x) float32 in [0, 1]) -> dict(embedding=(B, E, z, y, x),
            foreground=(B, 1, z, y, x) logits); already on ``device``. It is put in eval mode.
        raw: (Z, Y, X) uint8 (divided by 255) or float already scaled to [0, 1].
        window: (wz, wy, wx) window size; must suit the model's downsampling.
        stride: step between windows; None = :func:`~melecole.inference.options.default_stride`
            (half the window unless the margin and offsets need less). The last window along each
            axis is aligned to the end.
        margin: voxels cropped from each window side before blending (not at the volume border).
        offsets: C affinity offsets (dz, dy, dx).
        delta_d, norm: embeddings -> affinities (LOSS.DELTA_D, LOSS.NORM).
        blending: per-window weight profile: gaussian | bump | constant.
        batch_size: windows per forward pass.
        device: where the model runs; affinities of each window are computed there too.
        amp: autocast (float16) on CUDA; ignored on CPU.
        progress: a progress bar over windows (a bool or a LOG.PROGRESS_BAR setting).
        region: optional (z, y, x) slices (step 1) of ``raw``: outputs cover only this region (e.g.
            the labelled part of a padded raw) while the whole raw gives context. Only windows
            whose cropped part meets the region are predicted.
        tta: test-time augmentation variants (:func:`melecole.inference.tta.parse_tta`), averaged
            per window before blending; None = no TTA.
        backend: where the forward pass of each batch runs (INFERENCE.BACKEND): torch | onnxruntime |
            openvino | auto (:mod:`melecole.inference.backends`; a non-CPU device always runs torch).
            The onnxruntime / openvino backends use torch's thread count.

    Returns:
        affinities: float32 (C, Z', Y', X') for the region (default: the whole volume); pairs
            leaving the region hold ``INVALID_AFFINITY``.
        foreground: float32 (Z', Y', X') blended sigmoid of the foreground logits.

    Raises:
        ValueError: bad window / stride / margin, or a stride leaving some pairs uncovered.
        ConfigError: unknown backend, or a named backend whose package is not installed.
    """
    raw = np.asarray(raw)
    window, stride, margin, offsets = _check_geometry(raw, window, stride, margin, offsets)
    device = torch.device(device)
    grid = _WindowGrid(raw, window, stride, margin, offsets, blending, region, device)
    variants = list(tta or [IDENTITY])
    model.eval()
    forward = build_backend(backend, model, window, batch_size, device, amp=amp, parallel=len(variants))
    bar = progress_bar(total=len(grid.positions), desc="windows", unit="win", enabled=progress, leave=False)
    with torch.inference_mode():
        for first in range(0, len(grid.positions), batch_size):
            positions = grid.positions[first : first + batch_size]
            crops = grid.crops(positions)
            affinities, foreground = window_affinities(forward, crops, variants, offsets, float(delta_d), norm)
            for index, start in enumerate(positions):
                grid.accumulate(affinities[index], foreground[index], start)
            bar.update(len(positions))
    bar.close()
    return grid.finish()


def _normalise(
    affinities: np.ndarray,
    foreground: np.ndarray,
    inverse: list[tuple[np.ndarray, np.ndarray]],
    offsets: list[tuple[int, ...]],
) -> None:
    """Divides the weighted sums by the (separable) weight sums in place, one z-slice at a time.

    The inverse sums are 0 for pairs leaving the volume, which leaves them at INVALID_AFFINITY (0).
    Rounding in the blend can push a value a hair outside [0, 1]; it is clipped.
    """
    (inverse_z, fg_z), (inverse_y, fg_y), (inverse_x, fg_x) = inverse
    for channel in range(len(offsets)):
        plane = np.outer(inverse_y[channel], inverse_x[channel]).astype(np.float32)
        for z in range(affinities.shape[1]):
            section = affinities[channel, z]
            section *= plane * np.float32(inverse_z[channel, z])
            np.clip(section, 0.0, 1.0, out=section)
    plane = np.outer(fg_y, fg_x).astype(np.float32)
    for z in range(foreground.shape[0]):
        foreground[z] *= plane * np.float32(fg_z[z])
        np.clip(foreground[z], 0.0, 1.0, out=foreground[z])
