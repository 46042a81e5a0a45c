"""Test-time augmentation (INFERENCE.TTA): flips in z / y / x and the y<->x transpose, up to 16 variants.

Per window and variant: transform the input, run the model, turn the embeddings into affinities
inside the transformed window, undo the transform; the variants' affinities and foreground are
averaged before the sliding window blends windows (embeddings of two variants need not share a
frame, exactly as two windows need not).

Offsets. A variant maps voxel p of the window to ``M(p)``; its linear part ``L`` (negate the flipped
axes, then swap y and x if transposed) maps the pair (p, p + o) to (M(p), M(p) + L o). The channel
of offset o is therefore computed in the transformed frame for the transformed offset o' = L o and
moved back with the voxel: ``A[c, p] = A'_{o'}[M(p)]``. This is exact for any offset list. It is
the same value as remapping channels within the offset list: when o' = -o_k (a flipped offset),
the pair (q, q + o') is the pair (q + o', q + o' + o_k), so the value is channel k's at the partner
voxel q + o' (affinities are symmetric in the two voxels). Pairs that leave the window are invalid
(``INVALID_AFFINITY``) in every variant, because L maps the window onto itself.

Spec: "none" (or "") = no TTA; otherwise letters from "zyxt" (z/y/x flip, t = y<->x transpose) that
generate the variants: every subset of them, e.g. "yx" = 4 in-plane flips, "zyxt" = all 16.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from melecole.errors import ConfigError
from melecole.inference.affinities import affinities_tensor

__all__ = ["TTAVariant", "IDENTITY", "parse_tta", "window_affinities", "TTA_LETTERS"]

TTA_LETTERS = "zyxt"


@dataclass(frozen=True)
class TTAVariant:
    """Flip the axes in ``flips`` (0 = z, 1 = y, 2 = x), then, if ``transpose``, swap y and x."""

    flips: tuple[int, ...] = ()
    transpose: bool = False

    @property
    def name(self) -> str:
        return "".join("zyx"[axis] for axis in self.flips) + ("t" if self.transpose else "") or "identity"

    def apply(self, volume: torch.Tensor) -> torch.Tensor:
        """(..., Z, Y, X) -> the transformed volume (..., Z, Y', X')."""
        if self.flips:
            volume = torch.flip(volume, [axis - 3 for axis in self.flips])
        return volume.transpose(-1, -2) if self.transpose else volume

    def invert(self, volume: torch.Tensor) -> torch.Tensor:
        """Undoes :meth:`apply` on (..., Z, Y', X')."""
        if self.transpose:
            volume = volume.transpose(-1, -2)
        return torch.flip(volume, [axis - 3 for axis in self.flips]) if self.flips else volume

    def map_offset(self, offset: Sequence[int]) -> tuple[int, int, int]:
        """L o: the offset (dz, dy, dx) as seen in the transformed frame."""
        mapped = [-int(step) if axis in self.flips else int(step) for axis, step in enumerate(offset)]
        if self.transpose:
            mapped[1], mapped[2] = mapped[2], mapped[1]
        return tuple(mapped)


IDENTITY = TTAVariant()


def parse_tta(spec: str, window: Sequence[int] | None = None) -> list[TTAVariant]:
    """INFERENCE.TTA -> the variants (identity first); "none"/"" -> [IDENTITY].

    Raises:
        ConfigError: a letter outside "zyxt", a repeated letter, or "t" with a window whose y and x
            sizes differ (the transpose would change the window's shape).
    """
    text = str(spec).strip().lower()
    if text in ("", "none"):
        return [IDENTITY]
    if any(letter not in TTA_LETTERS for letter in text) or len(set(text)) != len(text):
        raise ConfigError(
            f"INFERENCE.TTA: {spec!r}, expected none or distinct letters from 'zyxt' (z/y/x flips, t = y<->x transpose)"
        )
    if "t" in text and window is not None and int(window[1]) != int(window[2]):
        raise ConfigError(
            f"INFERENCE.TTA: {spec!r} transposes y and x, but the window {list(window)} has y != x; "
            "expected a window with equal y and x sizes, or no 't'"
        )
    flip_axes = [axis for axis, letter in enumerate("zyx") if letter in text]
    transposes = (False, True) if "t" in text else (False,)
    return [
        TTAVariant(tuple(axis for axis, on in zip(flip_axes, chosen) if on), transpose)
        for transpose in transposes
        for chosen in itertools.product((False, True), repeat=len(flip_axes))
    ]


def window_affinities(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    batch: torch.Tensor,
    variants: Sequence[TTAVariant],
    offsets: Sequence[Sequence[int]],
    delta_d: float,
    norm: Literal["l1", "l2"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities and foreground of a batch of windows, averaged over the TTA variants.

    Args:
        forward: the model: (B, 1, z, y, x) -> {"embedding": (B, E, z, y, x), "foreground": (B, 1, z, y, x) logits}.
        batch: (B, 1, z, y, x) float input windows.
        variants: from :func:`parse_tta`; [IDENTITY] = plain prediction.
        offsets: C offsets (dz, dy, dx) in the untransformed frame.
        delta_d, norm: embeddings -> affinities (LOSS.DELTA_D, LOSS.NORM).

    Returns:
        affinities (B, C, z, y, x) float32, foreground (B, z, y, x) sigmoid probabilities, on the
        batch's device; pairs leaving the window hold ``INVALID_AFFINITY``.
    """
    offsets = [tuple(int(step) for step in offset) for offset in offsets]
    affinities = foreground = None
    for variant in variants:
        if variant.transpose and batch.shape[-1] != batch.shape[-2]:
            raise ValueError(f"TTA variant {variant.name!r} needs windows with y == x, got {tuple(batch.shape[-3:])}")
    if hasattr(forward, "run_many"):  # openvino: concurrent variants, outputs borrowed until the next one
        outputs = forward.run_many([variant.apply(batch) for variant in variants])  # type: ignore[attr-defined]
    else:
        outputs = (forward(variant.apply(batch)) for variant in variants)  # one variant in memory at a time
    for variant, output in zip(variants, outputs):
        mapped = [variant.map_offset(offset) for offset in offsets]
        variant_affinities = variant.invert(affinities_tensor(output["embedding"].float(), mapped, delta_d, norm))
        variant_foreground = variant.invert(torch.sigmoid(output["foreground"].float())[:, 0])
        if affinities is None:
            affinities, foreground = variant_affinities, variant_foreground
        else:
            affinities.add_(variant_affinities)
            foreground.add_(variant_foreground)
    if len(variants) > 1:
        affinities.div_(len(variants))
        foreground.div_(len(variants))
    return affinities, foreground
