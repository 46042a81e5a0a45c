"""The one options type of the segmentation, for whole volumes (``infer.py``) and blocks alike.

:func:`build_segmentation_options` is the only reader of the segmentation's config keys. The
``schedule`` says which keys choose the fragment-graph steps: ``volume`` (``infer.py``: voxel MWS,
then INFERENCE.AGGLOMERATION) or ``blocks`` (blockwise: BLOCKWISE.FRAGMENTS, BLOCKWISE.AGGLOMERATION).
The blockwise options (:class:`melecole.blockwise.plan.BlockwiseOptions`) are block geometry plus this.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from melecole.errors import ConfigError
from melecole.segmentation.agglomeration import AGGLOMERATION_MODES
from melecole.segmentation.fragments import FRAGMENT_ALGORITHMS, fragment_algorithm
from melecole.utils.offsets import number_of_attractive_channels, offset_reach

__all__ = ["SegmentationOptions", "build_segmentation_options", "config_triple", "Schedule"]

Triple = tuple[int, int, int]
Schedule = Literal["volume", "blocks"]


@dataclass(frozen=True)
class SegmentationOptions:
    """Everything the segmentation of stored affinities needs (plain values: picklable, json-able).

    Attributes:
        offsets: C offsets (dz, dy, dx), nearest-neighbour ones first (INFERENCE.OFFSETS).
        background: foreground probability below which voxels are background (INFERENCE.MWS_BACKGROUND).
        foreground_power: the voxel MWS's attractive weights x min(foreground of both ends) ** this
            (INFERENCE.MWS_FOREGROUND_POWER; 0 = off).
        strides: mutex-edge strides (z, y, x) of the voxel MWS (INFERENCE.MWS_STRIDES).
        randomized: random instead of regular strides (whole volume only).
        min_segment_size: segments with fewer voxels become 0 (INFERENCE.MIN_SEGMENT_SIZE).
        fill_background: voxels left at 0 get a segment (INFERENCE.FILL_BACKGROUND).
        fill_mode: how (INFERENCE.FILL_MODE): ``watershed`` (the segments flood 1 - foreground; without
            a foreground map the same as ``nearest``) or ``nearest`` (nearest segment).
        fragments: a name of :data:`FRAGMENT_ALGORITHMS` (blocks; whole volumes use the voxel MWS).
        fragment_params: that algorithm's own settings, read from its config keys.
        min_fragment_size: fragments with fewer voxels (in block + halo) become background before the
            region graph.
        agglomeration: ``none`` or a name of :data:`AGGLOMERATION_MODES`.
        agglomeration_threshold: the threshold of modes that take one.
    """

    offsets: tuple[Triple, ...]
    background: float = 0.5
    foreground_power: float = 0.0
    strides: Triple = (1, 1, 1)
    randomized: bool = False
    min_segment_size: int = 0
    fill_background: bool = False
    fill_mode: str = "watershed"
    fragments: str = "mws"
    fragment_params: tuple[tuple[str, Any], ...] = ()
    min_fragment_size: int = 0
    agglomeration: str = "none"
    agglomeration_threshold: float = 0.5

    @property
    def num_attractive(self) -> int:
        return number_of_attractive_channels(self.offsets)

    @property
    def reach(self) -> Triple:
        """Largest |offset| per axis: the context the region graph needs around a block."""
        return offset_reach(self.offsets)

    @property
    def fragment_channels(self) -> int:
        """Affinity channels the fragment algorithm reads (the first ones)."""
        reads = fragment_algorithm(self.fragments).channels
        return self.num_attractive if reads == "attractive" else len(self.offsets)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["offsets"] = [list(o) for o in self.offsets]
        values["fragment_params"] = dict(self.fragment_params)
        return values

    def attrs(self, background: float | None = None) -> dict[str, Any]:
        """The whole-volume settings as HDF5 dataset attributes (``background`` overrides the threshold)."""
        return {
            "background_threshold": self.background if background is None else background,
            "foreground_power": self.foreground_power,
            "strides": list(self.strides),
            "randomized_strides": self.randomized,
            "min_segment_size": self.min_segment_size,
            "fill_background": self.fill_background,
            "fill_mode": self.fill_mode,
            "agglomeration": self.agglomeration,
            "agglomeration_threshold": self.agglomeration_threshold,
        }


def config_triple(value: Any, key: str) -> Triple:
    """A (z, y, x) config value as an int triple; one-line ConfigError naming ``key`` otherwise."""
    values = [int(v) for v in value]
    if len(values) != 3:
        raise ConfigError(f"{key}: {list(value)}, expected 3 values (z, y, x)")
    return tuple(values)  # type: ignore[return-value]


def _config_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"{key}: missing from the config, expected it (a fragment algorithm's setting)")
        node = node[part]
    return tuple(node) if isinstance(node, (list, tuple)) else node


def _min_fragment_size(cfg: Any, fragments: str) -> int:
    """BLOCKWISE.MIN_FRAGMENT_SIZE; -1 (auto): INFERENCE.MIN_SEGMENT_SIZE where the algorithm says so, else 0."""
    value = int(cfg.BLOCKWISE.MIN_FRAGMENT_SIZE)
    if value < -1:
        raise ConfigError(f"BLOCKWISE.MIN_FRAGMENT_SIZE: {value}, expected -1 (auto), 0 (keep all) or a size")
    if value == -1:
        return int(cfg.INFERENCE.MIN_SEGMENT_SIZE) if fragment_algorithm(fragments).auto_min_size else 0
    return value


def build_segmentation_options(
    cfg: Any, schedule: Schedule = "volume", *, fragments: str | None = None
) -> SegmentationOptions:
    """The segmentation options of a merged config.

    Args:
        cfg: the config.
        schedule: ``volume`` (``infer.py``) or ``blocks`` (blockwise): which keys choose the
            fragments and the agglomeration (see the module docstring).
        fragments: overrides BLOCKWISE.FRAGMENTS (``--fragments``).

    Raises:
        ConfigError: offsets without leading nearest-neighbour offsets, an unknown fragment algorithm
            or agglomeration mode (the message lists the choices).
    """
    offsets = tuple(config_triple(o, "INFERENCE.OFFSETS") for o in cfg.INFERENCE.OFFSETS)
    try:
        number_of_attractive_channels(offsets)
    except ValueError as error:
        raise ConfigError(f"INFERENCE.OFFSETS: {error}") from None
    common = dict(
        offsets=offsets,
        background=float(cfg.INFERENCE.MWS_BACKGROUND),
        foreground_power=float(cfg.INFERENCE.MWS_FOREGROUND_POWER),
        strides=config_triple(cfg.INFERENCE.MWS_STRIDES, "INFERENCE.MWS_STRIDES"),
        randomized=bool(cfg.INFERENCE.MWS_RANDOMIZED_STRIDES),
        min_segment_size=int(cfg.INFERENCE.MIN_SEGMENT_SIZE),
        fill_background=bool(cfg.INFERENCE.FILL_BACKGROUND),
        fill_mode=str(cfg.INFERENCE.FILL_MODE),
    )
    if schedule == "volume":
        return SegmentationOptions(
            **common,  # type: ignore[arg-type]
            agglomeration=str(cfg.INFERENCE.AGGLOMERATION),
            agglomeration_threshold=float(cfg.INFERENCE.AGGLOMERATION_THRESHOLD),
        )
    mode = str(fragments or cfg.BLOCKWISE.FRAGMENTS)
    if mode not in FRAGMENT_ALGORITHMS:
        flag = "--fragments" if fragments else "BLOCKWISE.FRAGMENTS"
        raise ConfigError(f"{flag}: '{mode}', expected one of {', '.join(FRAGMENT_ALGORITHMS)}")
    agglomeration = str(cfg.BLOCKWISE.AGGLOMERATION)
    if agglomeration not in AGGLOMERATION_MODES:
        choices = ", ".join(AGGLOMERATION_MODES)
        raise ConfigError(f"BLOCKWISE.AGGLOMERATION: '{agglomeration}', expected one of {choices}")
    keys = fragment_algorithm(mode).config_keys
    return SegmentationOptions(
        **common,  # type: ignore[arg-type]
        fragments=mode,
        fragment_params=tuple((name, _config_value(cfg, key)) for name, key in keys.items()),
        min_fragment_size=_min_fragment_size(cfg, mode),
        agglomeration=agglomeration,
        agglomeration_threshold=float(cfg.BLOCKWISE.THRESHOLD),
    )
