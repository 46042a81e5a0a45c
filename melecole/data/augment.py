"""EM augmentations on training patches.

Every augmentation is a small class with plain keyword arguments (a probability ``p`` and its
strength) called as ``raw, labels = augmentation(raw, labels, rng)`` with

- ``raw``: float32 (Z, Y, X) in [0, 1],
- ``labels``: integer (Z, Y, X) or None (unlabelled data),
- ``rng``: a ``np.random.Generator``; the same generator state gives the same output.

Inputs are never modified in place (outputs may be views of them). Spatial augmentations move
raw and labels with exactly the same voxel mapping; intensity augmentations leave labels alone.
Shapes never change. Augmentations that move content in-plane (Elastic, Misalignment) declare a
``margin`` (z, y, x): :class:`Compose` can be given a region larger by the summed margins and
crop its centre once those have run, so no reflected or empty border reaches the output. Where
content does leave the array, raw is reflected and labels become 0 (ignored).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from yacs.config import CfgNode

from melecole.errors import ConfigError

# (raw (Z, Y, X) float32, labels (Z, Y, X) integer or None)
AugmentedPair = Tuple[np.ndarray, Optional[np.ndarray]]

__all__ = [
    "Augmentation",
    "Flip",
    "Rotate",
    "Elastic",
    "Grayscale",
    "MissingSection",
    "MissingParts",
    "Misalignment",
    "MotionBlur",
    "CutBlur",
    "Noise",
    "Compose",
    "build_augmentor",
    "center_crop",
]

class Augmentation:
    """Base class: ``__call__`` applies :meth:`apply` with probability ``p``."""

    def __init__(self, p: float = 1.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability p must be in [0, 1], got {p}")
        self.p = float(p)

    @property
    def margin(self) -> tuple[int, int, int]:
        """Context (z, y, x) per side that this augmentation may move into the patch."""
        return (0, 0, 0)

    def __call__(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        if self.p <= 0.0 or rng.random() >= self.p:
            return raw, labels
        return self.apply(raw, labels, rng)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        """The augmentation itself, always applied; raw (Z, Y, X) float32, labels (Z, Y, X) or None."""
        raise NotImplementedError

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({arguments})"


def _check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    if value < 0 or (not allow_zero and value == 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ------------------------------------------------------------------------------------------------
# Spatial
# ------------------------------------------------------------------------------------------------


class Flip(Augmentation):
    """Flips along each of ``axes`` with probability 1/2, then swaps y and x with probability 1/2.

    The swap is only done when Y == X (the shape never changes).
    """

    def __init__(self, p: float = 1.0, axes: Sequence[int] = (0, 1, 2), transpose: bool = True) -> None:
        super().__init__(p)
        self.axes = tuple(int(a) for a in axes)
        self.transpose = bool(transpose)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        flip_axes = tuple(a for a, flip in zip(self.axes, rng.random(len(self.axes)) < 0.5) if flip)
        swap = rng.random() < 0.5 and self.transpose and raw.shape[1] == raw.shape[2]
        raw = np.flip(raw, flip_axes) if flip_axes else raw
        labels = np.flip(labels, flip_axes) if flip_axes and labels is not None else labels
        if swap:
            raw = raw.transpose(0, 2, 1)
            labels = labels.transpose(0, 2, 1) if labels is not None else None
        return raw, labels


class Rotate(Augmentation):
    """In-plane rotation by k * 90 degrees, k in {1, 2, 3} (only k = 2 when Y != X)."""

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        k = int(rng.integers(1, 4)) if raw.shape[1] == raw.shape[2] else 2
        raw = np.rot90(raw, k, axes=(1, 2))
        labels = np.rot90(labels, k, axes=(1, 2)) if labels is not None else None
        return raw, labels


def _smooth_displacement(
    shape: tuple[int, int], alpha: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """(2, Y, X) smooth random displacement (dy, dx) whose largest component is ``alpha`` pixels."""
    noise = rng.standard_normal((2, *shape))
    field = np.stack([ndimage.gaussian_filter(n, sigma, mode="reflect") for n in noise])
    peak = np.abs(field).max()
    return field * (alpha / peak) if peak > 0 else field


class Elastic(Augmentation):
    """Smooth random in-plane deformation, one 2D field for all sections.

    ``alpha`` is the largest displacement in pixels, ``sigma`` the gaussian smoothing of the field
    (larger = smoother). Raw is interpolated linearly (reflected at the border); labels take the
    nearest source voxel of exactly the same mapping (0 where it falls outside).
    """

    def __init__(self, p: float = 0.5, alpha: float = 6.0, sigma: float = 8.0) -> None:
        super().__init__(p)
        _check_positive("alpha", alpha)
        _check_positive("sigma", sigma, allow_zero=False)
        self.alpha = float(alpha)
        self.sigma = float(sigma)

    @property
    def margin(self) -> tuple[int, int, int]:
        return (0, math.ceil(self.alpha), math.ceil(self.alpha))

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        _, height, width = raw.shape
        displacement = _smooth_displacement((height, width), self.alpha, self.sigma, rng)
        grid_y, grid_x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        source = np.stack([grid_y + displacement[0], grid_x + displacement[1]])
        warped = np.empty(raw.shape, dtype=np.float32)
        for z in range(raw.shape[0]):
            ndimage.map_coordinates(raw[z], source, output=warped[z], order=1, mode="reflect")
        if labels is not None:
            # Nearest neighbour by explicit indexing: exact for uint64 ids (no float round trip).
            nearest_y = np.rint(source[0]).astype(np.intp)
            nearest_x = np.rint(source[1]).astype(np.intp)
            inside = (nearest_y >= 0) & (nearest_y < height) & (nearest_x >= 0) & (nearest_x < width)
            labels = labels[:, np.clip(nearest_y, 0, height - 1), np.clip(nearest_x, 0, width - 1)]
            labels[:, ~inside] = 0
        return warped, labels


def _shift_section(section: np.ndarray, dy: int, dx: int, fill: str) -> np.ndarray:
    """(Y, X) image moved by (dy, dx) pixels; uncovered pixels reflected (fill='reflect') or 0."""
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx)))
    padded = np.pad(section, pad, mode="reflect") if fill == "reflect" else np.pad(section, pad)
    height, width = section.shape
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[top : top + height, left : left + width]


class Misalignment(Augmentation):
    """Section misalignment; labels move with the raw.

    Mode "slip" (probability ``slip_ratio``) moves one section, mode "shift" moves every section
    from a random index on, by the same random in-plane (dy, dx) with |dy|, |dx| <= displacement.
    Uncovered pixels: raw reflected, labels 0.
    """

    def __init__(self, p: float = 0.3, displacement: int = 8, slip_ratio: float = 0.5) -> None:
        super().__init__(p)
        _check_positive("displacement", displacement)
        if not 0.0 <= slip_ratio <= 1.0:
            raise ValueError(f"slip_ratio must be in [0, 1], got {slip_ratio}")
        self.displacement = int(displacement)
        self.slip_ratio = float(slip_ratio)

    @property
    def margin(self) -> tuple[int, int, int]:
        return (0, self.displacement, self.displacement)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        depth = raw.shape[0]
        if depth < 2 or self.displacement == 0:
            return raw, labels
        dy, dx = (int(v) for v in rng.integers(-self.displacement, self.displacement + 1, size=2))
        if rng.random() < self.slip_ratio:
            sections = [int(rng.integers(0, depth))]
        else:
            sections = list(range(int(rng.integers(1, depth)), depth))
        raw = raw.copy()
        labels = labels.copy() if labels is not None else None
        for z in sections:
            raw[z] = _shift_section(raw[z], dy, dx, "reflect")
            if labels is not None:
                labels[z] = _shift_section(labels[z], dy, dx, "zero")
        return raw, labels


# ------------------------------------------------------------------------------------------------
# Intensity and artefacts (labels unchanged)
# ------------------------------------------------------------------------------------------------


class Grayscale(Augmentation):
    """Contrast, brightness and gamma, drawn per section ("2d") or once for the patch ("3d").

    value -> clip((value - mean) * c + mean + b, 0, 1) ** g with c = 1 + U(-contrast, contrast),
    b = U(-brightness, brightness), g = 2 ** U(-gamma, gamma). ``mode`` "random" picks 2d or 3d
    with probability 1/2. The output stays in [0, 1].
    """

    def __init__(
        self,
        p: float = 0.75,
        contrast: float = 0.3,
        brightness: float = 0.15,
        gamma: float = 0.3,
        mode: str = "random",
    ) -> None:
        super().__init__(p)
        for name, value in (("contrast", contrast), ("brightness", brightness), ("gamma", gamma)):
            _check_positive(name, value)
        if mode not in ("random", "2d", "3d"):
            raise ValueError(f"mode must be random, 2d or 3d, got {mode!r}")
        self.contrast = float(contrast)
        self.brightness = float(brightness)
        self.gamma = float(gamma)
        self.mode = mode

    def _adjust(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        contrast = 1.0 + rng.uniform(-self.contrast, self.contrast)
        brightness = rng.uniform(-self.brightness, self.brightness)
        gamma = 2.0 ** rng.uniform(-self.gamma, self.gamma)
        mean = float(image.mean())
        adjusted = (image - np.float32(mean)) * np.float32(contrast) + np.float32(mean + brightness)
        np.clip(adjusted, 0.0, 1.0, out=adjusted)
        return np.power(adjusted, np.float32(gamma), out=adjusted)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        mode = self.mode if self.mode != "random" else ("2d" if rng.random() < 0.5 else "3d")
        raw = np.asarray(raw, dtype=np.float32)
        if mode == "3d":
            return self._adjust(raw, rng), labels
        return np.stack([self._adjust(section, rng) for section in raw]), labels


class MissingSection(Augmentation):
    """Replaces 1..num_sections random whole sections by 0 ("blank") or a copy of a neighbour ("copy").

    ``mode`` "random" picks per section. Labels are unchanged (the network must infer them).
    """

    def __init__(self, p: float = 0.15, num_sections: int = 2, mode: str = "random") -> None:
        super().__init__(p)
        if num_sections < 1:
            raise ValueError(f"num_sections must be >= 1, got {num_sections}")
        if mode not in ("random", "blank", "copy"):
            raise ValueError(f"mode must be random, blank or copy, got {mode!r}")
        self.num_sections = int(num_sections)
        self.mode = mode

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        depth = raw.shape[0]
        count = int(rng.integers(1, min(self.num_sections, depth) + 1))
        sections = rng.choice(depth, size=count, replace=False)
        original = raw
        raw = raw.copy()
        for z in sections:
            mode = self.mode if self.mode != "random" else ("blank" if rng.random() < 0.5 else "copy")
            if mode == "copy" and depth > 1:
                neighbour = z - 1 if (z == depth - 1 or (z > 0 and rng.random() < 0.5)) else z + 1
                raw[z] = original[neighbour]
            else:
                raw[z] = 0.0
        return raw, labels


class MissingParts(Augmentation):
    """A rectangle in one section is blanked (0) or smeared (its first row/column repeated).

    The rectangle's sides are up to ``size`` times the section's sides.
    """

    def __init__(self, p: float = 0.15, size: float = 0.3) -> None:
        super().__init__(p)
        if not 0.0 < size <= 1.0:
            raise ValueError(f"size must be in (0, 1], got {size}")
        self.size = float(size)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        depth, height, width = raw.shape
        z = int(rng.integers(0, depth))
        box_height = int(rng.integers(1, max(1, int(self.size * height)) + 1))
        box_width = int(rng.integers(1, max(1, int(self.size * width)) + 1))
        top = int(rng.integers(0, height - box_height + 1))
        left = int(rng.integers(0, width - box_width + 1))
        raw = raw.copy()
        region = raw[z, top : top + box_height, left : left + box_width]
        choice = rng.random()
        if choice < 1.0 / 3.0:
            region[...] = 0.0
        elif choice < 2.0 / 3.0:
            region[...] = region[:1, :]  # smear along y
        else:
            region[...] = region[:, :1]  # smear along x
        return raw, labels


def _line_kernel(size: int, angle: float) -> np.ndarray:
    """(size, size) normalised kernel along a line through the centre at ``angle`` radians."""
    kernel = np.zeros((size, size), dtype=np.float32)
    centre = (size - 1) / 2.0
    for t in np.linspace(-centre, centre, 2 * size):
        kernel[int(round(centre + t * math.sin(angle))), int(round(centre + t * math.cos(angle)))] = 1.0
    return kernel / kernel.sum()


class MotionBlur(Augmentation):
    """Blurs 1..sections random sections: a line kernel of ``kernel_size`` pixels at a random
    angle (motion) or a gaussian with sigma in [sigma / 2, sigma] (defocus), chosen per section.
    """

    def __init__(self, p: float = 0.15, sections: int = 2, kernel_size: int = 9, sigma: float = 2.0) -> None:
        super().__init__(p)
        if sections < 1:
            raise ValueError(f"sections must be >= 1, got {sections}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        _check_positive("sigma", sigma)
        self.sections, self.kernel_size, self.sigma = int(sections), int(kernel_size), float(sigma)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        depth = raw.shape[0]
        count = int(rng.integers(1, min(self.sections, depth) + 1))
        raw = np.array(raw, dtype=np.float32, copy=True)
        for z in rng.choice(depth, size=count, replace=False):
            if rng.random() < 0.5:
                kernel = _line_kernel(self.kernel_size, rng.uniform(0.0, math.pi))
                raw[z] = ndimage.convolve(raw[z], kernel, mode="reflect")
            else:
                raw[z] = ndimage.gaussian_filter(raw[z], rng.uniform(0.5, 1.0) * self.sigma, mode="reflect")
        return raw, labels


class CutBlur(Augmentation):
    """Down- and up-samples (in-plane, all sections) a random box with sides up to
    ``length_ratio`` of the patch, by a factor drawn from ``down_ratio`` = (min, max).
    """

    def __init__(
        self, p: float = 0.3, length_ratio: float = 0.4, down_ratio: Sequence[float] = (2.0, 6.0)
    ) -> None:
        super().__init__(p)
        if not 0.0 < length_ratio <= 1.0:
            raise ValueError(f"length_ratio must be in (0, 1], got {length_ratio}")
        if len(down_ratio) != 2 or not 1.0 <= down_ratio[0] <= down_ratio[1]:
            raise ValueError(f"down_ratio must be (min, max) with 1 <= min <= max, got {list(down_ratio)}")
        self.length_ratio = float(length_ratio)
        self.down_ratio = (float(down_ratio[0]), float(down_ratio[1]))

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        from skimage.transform import resize

        depth, height, width = raw.shape
        box_height = int(rng.integers(1, max(1, int(self.length_ratio * height)) + 1))
        box_width = int(rng.integers(1, max(1, int(self.length_ratio * width)) + 1))
        top = int(rng.integers(0, height - box_height + 1))
        left = int(rng.integers(0, width - box_width + 1))
        factor = rng.uniform(*self.down_ratio)
        small = (depth, max(1, round(box_height / factor)), max(1, round(box_width / factor)))
        raw = np.array(raw, dtype=np.float32, copy=True)
        region = raw[:, top : top + box_height, left : left + box_width]
        low = resize(region, small, order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
        region[...] = resize(
            low, region.shape, order=1, mode="edge", anti_aliasing=False, preserve_range=True
        )
        np.clip(raw, 0.0, 1.0, out=raw)
        return raw, labels


class Noise(Augmentation):
    """Additive gaussian noise with standard deviation U(0, std); the result is clipped to [0, 1]."""

    def __init__(self, p: float = 0.3, std: float = 0.05) -> None:
        super().__init__(p)
        _check_positive("std", std)
        self.std = float(std)

    def apply(self, raw: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> AugmentedPair:
        sigma = rng.uniform(0.0, self.std)
        noisy = raw + rng.normal(0.0, sigma, size=raw.shape).astype(np.float32)
        return np.clip(noisy, 0.0, 1.0, out=noisy), labels


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


def center_crop(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """The centred (size) box of ``array`` (Z, Y, X); ``array`` must be at least that large."""
    starts = [(s - c) // 2 for s, c in zip(array.shape, size)]
    if min(starts) < 0:
        raise ValueError(f"cannot crop {tuple(size)} from shape {array.shape}")
    return array[tuple(slice(b, b + c) for b, c in zip(starts, size))]


class Compose:
    """Applies augmentations in order.

    ``margin`` is the summed context (z, y, x) per side they need. Given ``crop_size``, the input
    may be larger (by up to 2 * margin) and is centre-cropped to ``crop_size`` right after the last
    augmentation that has a margin, so later (intensity) augmentations work on the final patch.
    """

    def __init__(self, transforms: Sequence[Augmentation]) -> None:
        self.transforms = list(transforms)

    @property
    def margin(self) -> tuple[int, int, int]:
        total = np.zeros(3, dtype=int)
        for transform in self.transforms:
            total += np.asarray(transform.margin)
        return tuple(int(m) for m in total)  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(
        self,
        raw: np.ndarray,
        labels: np.ndarray | None,
        rng: np.random.Generator,
        crop_size: Sequence[int] | None = None,
    ) -> AugmentedPair:
        last_spatial = max((i for i, t in enumerate(self.transforms) if any(t.margin)), default=-1)

        def crop(raw: np.ndarray, labels: np.ndarray | None) -> AugmentedPair:
            if crop_size is None:
                return raw, labels
            cropped_labels = center_crop(labels, crop_size) if labels is not None else None
            return center_crop(raw, crop_size), cropped_labels

        if last_spatial < 0:
            raw, labels = crop(raw, labels)
        for index, transform in enumerate(self.transforms):
            raw, labels = transform(raw, labels, rng)
            if index == last_spatial:
                raw, labels = crop(raw, labels)
        return raw, labels

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])" if inner else "Compose([])"


# AUGMENTATION.* groups that change intensities only (no voxel moves): usable when voxel
# correspondence must be kept, e.g. for the two MoCo views.
INTENSITY_GROUPS = ("MISSING_SECTION", "MISSING_PARTS", "MOTION_BLUR", "CUT_BLUR", "GRAYSCALE", "NOISE")


def build_augmentor(cfg: CfgNode, groups: Sequence[str] | None = None) -> Compose:
    """Compose of the AUGMENTATION.* groups that are enabled (empty when AUGMENTATION.ENABLED is off).

    Order: flip, rotate, elastic, misalignment (spatial, need margin), then missing section,
    missing parts, motion blur, cut blur, grayscale, noise. ``groups`` restricts the choice to
    those group names (e.g. INTENSITY_GROUPS).
    """
    aug = cfg.AUGMENTATION
    if not aug.ENABLED:
        return Compose([])
    factories = [
        ("FLIP", lambda g: Flip(p=g.P)),
        ("ROTATE", lambda g: Rotate(p=g.P)),
        ("ELASTIC", lambda g: Elastic(p=g.P, alpha=g.ALPHA, sigma=g.SIGMA)),
        ("MISALIGNMENT", lambda g: Misalignment(p=g.P, displacement=g.DISPLACEMENT, slip_ratio=g.SLIP_RATIO)),
        ("MISSING_SECTION", lambda g: MissingSection(p=g.P, num_sections=g.NUM_SECTIONS)),
        ("MISSING_PARTS", lambda g: MissingParts(p=g.P, size=g.SIZE)),
        (
            "MOTION_BLUR",
            lambda g: MotionBlur(p=g.P, sections=g.SECTIONS, kernel_size=g.KERNEL_SIZE, sigma=g.SIGMA),
        ),
        ("CUT_BLUR", lambda g: CutBlur(p=g.P, length_ratio=g.LENGTH_RATIO, down_ratio=g.DOWN_RATIO)),
        (
            "GRAYSCALE",
            lambda g: Grayscale(p=g.P, contrast=g.CONTRAST, brightness=g.BRIGHTNESS, gamma=g.GAMMA),
        ),
        ("NOISE", lambda g: Noise(p=g.P, std=g.STD)),
    ]
    transforms: list[Augmentation] = []
    for name, factory in factories:
        group = aug[name]
        if not group.ENABLED or (groups is not None and name not in groups):
            continue
        try:
            transforms.append(factory(group))
        except ValueError as error:
            raise ConfigError(f"AUGMENTATION.{name}: {error}") from None
    return Compose(transforms)
