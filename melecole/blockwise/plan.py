"""Options and the block grid of a blockwise segmentation.

:class:`BlockwiseOptions` is built once from the config (:func:`build_options`) and passed down;
:class:`BlockPlan` tiles a (Z, Y, X) volume into blocks (C order, the last block per axis clipped)
and gives each block's box with or without a halo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from yacs.config import CfgNode as CN

from melecole.errors import ConfigError
from melecole.io.volumes import iter_blocks
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES
from melecole.segmentation.fragments import FRAGMENT_ALGORITHMS
from melecole.segmentation.options import SegmentationOptions, build_segmentation_options, config_triple

__all__ = ["BlockwiseOptions", "BlockPlan", "build_options", "check_blockwise_config"]

Box = tuple[slice, slice, slice]
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class BlockwiseOptions:
    """Block geometry plus the segmentation options: everything a block task needs besides its inputs
    (plain values: picklable, json-able).

    Attributes:
        block_shape: (z, y, x) voxels per block.
        output_chunks: (z, y, x) storage chunks of the segmentation; divide ``block_shape``.
        halo: (z, y, x) context read around a block for its fragments (>= the offsets' reach).
        fill_halo: (z, y, x) context for the background fill.
        segmentation: :class:`melecole.segmentation.options.SegmentationOptions` (``blocks`` schedule).
    """

    block_shape: Triple
    output_chunks: Triple
    halo: Triple
    fill_halo: Triple
    segmentation: SegmentationOptions

    @property
    def offsets(self) -> tuple[Triple, ...]:
        return self.segmentation.offsets

    @property
    def reach(self) -> Triple:
        """Largest |offset| per axis: the context the region graph needs around a block."""
        return self.segmentation.reach

    @property
    def fragment_channels(self) -> int:
        """Affinity channels the fragment pass reads (the first ones)."""
        return self.segmentation.fragment_channels

    def to_dict(self) -> dict[str, Any]:
        geometry = {key: list(getattr(self, key)) for key in ("block_shape", "output_chunks", "halo", "fill_halo")}
        return {**geometry, **self.segmentation.to_dict()}


def check_blockwise_config(cfg: CN) -> None:
    """Validates the BLOCKWISE group (one-line ConfigError naming the key); modes from the registries."""
    group = cfg.BLOCKWISE
    for key in ("BLOCK_SHAPE", "OUTPUT_CHUNKS"):
        if min(config_triple(group[key], f"BLOCKWISE.{key}")) < 1:
            raise ConfigError(f"BLOCKWISE.{key}: {list(group[key])}, expected 3 positive values (z, y, x)")
    for key in ("HALO", "FILL_HALO"):
        if len(group[key]) and min(config_triple(group[key], f"BLOCKWISE.{key}")) < 0:
            raise ConfigError(f"BLOCKWISE.{key}: {list(group[key])}, expected 3 values >= 0 or []")
    if group.FRAGMENTS not in FRAGMENT_ALGORITHMS:
        raise ConfigError(
            f"BLOCKWISE.FRAGMENTS: '{group.FRAGMENTS}', expected one of {', '.join(FRAGMENT_ALGORITHMS)}"
        )
    if group.AGGLOMERATION not in AGGLOMERATION_MODES:
        raise ConfigError(
            f"BLOCKWISE.AGGLOMERATION: '{group.AGGLOMERATION}', expected one of {', '.join(AGGLOMERATION_MODES)}"
        )
    for key in ("THRESHOLD", "WATERSHED_THRESHOLD"):
        if not 0.0 <= float(group[key]) <= 1.0:
            raise ConfigError(f"BLOCKWISE.{key}: {group[key]}, expected a value in [0, 1]")
    if int(group.WORKERS) < 1:
        raise ConfigError(f"BLOCKWISE.WORKERS: {group.WORKERS}, expected >= 1")


def build_options(
    cfg: CN, *, block_shape: Sequence[int] | None = None, fragments: str | None = None
) -> BlockwiseOptions:
    """The options of a run from the config; ``block_shape`` / ``fragments`` override the config.

    Raises:
        ConfigError: bad BLOCKWISE keys, offsets without leading nearest-neighbour offsets, a halo
            below the offsets' reach, or a block that is not a multiple of the output chunks.
    """
    check_blockwise_config(cfg)
    group = cfg.BLOCKWISE
    segmentation = build_segmentation_options(cfg, "blocks", fragments=fragments)
    reach = segmentation.reach
    block = config_triple(block_shape if block_shape is not None else group.BLOCK_SHAPE, "--block")
    chunks = config_triple(group.OUTPUT_CHUNKS, "BLOCKWISE.OUTPUT_CHUNKS")
    if min(block) < 1:
        raise ConfigError(f"--block: {list(block)}, expected 3 positive values (z, y, x)")
    if any(b % c for b, c in zip(block, chunks)):
        aligned = [max(c, round(b / c) * c) for b, c in zip(block, chunks)]
        raise ConfigError(
            f"--block: {list(block)} is not a multiple of the output chunks BLOCKWISE.OUTPUT_CHUNKS {list(chunks)}, "
            f"expected e.g. {aligned} (no two tasks may write one chunk)"
        )
    halo = config_triple(group.HALO, "BLOCKWISE.HALO") if len(group.HALO) else tuple(2 * r for r in reach)
    if any(h < r for h, r in zip(halo, reach)):
        raise ConfigError(f"BLOCKWISE.HALO: {list(halo)}, expected at least the largest |offset| {list(reach)}")
    fill_halo = config_triple(group.FILL_HALO, "BLOCKWISE.FILL_HALO") if len(group.FILL_HALO) else halo
    return BlockwiseOptions(block, chunks, halo, fill_halo, segmentation)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockPlan:
    """The blocks tiling a (Z, Y, X) volume; block ``i`` is the i-th box of :func:`iter_blocks`."""

    shape: Triple
    block_shape: Triple

    @property
    def grid(self) -> Triple:
        return tuple(-(-s // b) for s, b in zip(self.shape, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        z, y, x = self.grid
        return z * y * x

    @property
    def block_voxels(self) -> int:
        z, y, x = self.block_shape
        return z * y * x

    def box(self, index: int) -> Box:
        """Slices of block ``index`` (clipped at the volume end)."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range (0..{self.num_blocks - 1})")
        _, gy, gx = self.grid
        position = (index // (gy * gx), (index // gx) % gy, index % gx)
        return tuple(  # type: ignore[return-value]
            slice(p * b, min((p + 1) * b, s)) for p, b, s in zip(position, self.block_shape, self.shape)
        )

    def padded(self, index: int, halo: Sequence[int]) -> tuple[Box, Box]:
        """(box grown by ``halo`` and clipped to the volume, the block's slices inside that box)."""
        box = self.box(index)
        outer = tuple(slice(max(0, b.start - h), min(s, b.stop + h)) for b, h, s in zip(box, halo, self.shape))
        inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
        return outer, inner  # type: ignore[return-value]

    def boxes(self) -> list[Box]:
        return list(iter_blocks(self.shape, self.block_shape))  # type: ignore[arg-type]
