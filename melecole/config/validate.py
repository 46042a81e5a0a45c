"""Every check of config values beyond their types, in one place (called by ``load_cfg``).

Code that reads a key later may rely on these: each rule names the key, what was found and what is
expected, and raises :class:`melecole.errors.ConfigError`.
"""

from __future__ import annotations

import math
from typing import Any

from yacs.config import CfgNode as CN

from melecole.errors import ConfigError
from melecole.utils.progress import PROGRESS_CHOICES

__all__ = [
    "OBJECTIVE_SELECTION",
    "check_inference_windows",
    "downsampling_factors",
    "objective_name",
    "overlap_setting",
    "validate_cfg",
    "window_setting",
]

# The training objectives (built by melecole.losses.OBJECTIVE_REGISTRY, same names) and the config values
# that select each. No key names the objective: MOCO.ENABLED and MOCO.MODE choose it.
OBJECTIVE_SELECTION: dict[str, dict[str, Any]] = {
    "metric": {"MOCO.ENABLED": False},
    "moco_joint": {"MOCO.ENABLED": True, "MOCO.MODE": "joint"},
    "moco_pretrain": {"MOCO.ENABLED": True, "MOCO.MODE": "pretrain"},
}


def _selection_values(key: str) -> tuple:
    """The values of ``key`` that select an objective, in table order (MOCO.MODE: joint, pretrain)."""
    return tuple(dict.fromkeys(values[key] for values in OBJECTIVE_SELECTION.values() if key in values))


_CHOICES = {
    "HARDWARE.DEVICE": ("auto", "cpu", "cuda"),
    "MODEL.NORM": ("batch", "instance", "group", "none"),
    "MODEL.ACTIVATION": ("relu", "elu", "leaky_relu", "gelu"),
    "LOSS.NORM": ("l1", "l2"),
    "OPTIM.OPTIMIZER": ("adam", "adamw", "sgd"),
    "OPTIM.SCHEDULER": ("cosine", "constant", "step"),
    "MOCO.MODE": _selection_values("MOCO.MODE"),
    "MOCO.PROJECTION_INPUT": ("features", "embedding"),
    "INFERENCE.BLENDING": ("gaussian", "bump", "constant"),
    "INFERENCE.BACKEND": ("auto", "torch", "onnxruntime", "openvino"),
    "INFERENCE.FILL_MODE": ("watershed", "nearest"),
    "INFERENCE.AGGLOMERATION": ("none", "mws", "mean", "gasp_average", "gasp_signed", "mala_median", "multicut"),
    "LOG.PROGRESS_BAR": PROGRESS_CHOICES,
}

# key -> smallest allowed value (inclusive).
_AT_LEAST = {
    "HARDWARE.NUM_GPUS": 1,
    "HARDWARE.NUM_WORKERS": 0,
    "HARDWARE.NUM_THREADS": 0,
    "DATASET.MAX_REDRAWS": 0,
    "DATASET.MIN_OBJECT_SIZE": 0,
    "DATASET.BOUNDARY_WIDTH": 0,
    "DATASET.BACKGROUND_WIDTH": 0,
    "MODEL.IN_CHANNELS": 1,
    "MODEL.NORM_GROUPS": 1,
    "MODEL.EMBEDDING_DIMENSION": 1,
    "LOSS.ALPHA": 0,
    "LOSS.BETA": 0,
    "LOSS.GAMMA": 0,
    "LOSS.FOREGROUND_WEIGHT": 0,
    "LOSS.AFFINITY_WEIGHT": 0,
    "LOSS.LSD_WEIGHT": 0,
    "INFERENCE.MWS_FOREGROUND_POWER": 0,
    "OPTIM.MIN_LR": 0,
    "OPTIM.WEIGHT_DECAY": 0,
    "OPTIM.WARMUP_ITER": 0,
    "OPTIM.STEP_SIZE": 1,
    "OPTIM.TOTAL_ITER": 1,
    "OPTIM.BATCH_SIZE": 1,
    "OPTIM.GRAD_CLIP": 0,
    "MOCO.WEIGHT": 0,
    "MOCO.QUEUE_SIZE": 1,
    "MOCO.PROJECTION_DIM": 1,
    "MOCO.PROJECTION_HIDDEN": 0,
    "MOCO.NUM_SAMPLES": 1,
    "MOCO.BATCH_SIZE": 0,
    "INFERENCE.BATCH_SIZE": 0,
    "INFERENCE.MIN_SEGMENT_SIZE": 0,
    "LOG.CHECKPOINT_FREQUENCY": 0,
    "LOG.LOG_FREQUENCY": 1,
    "LOG.VAL_FREQUENCY": 0,
    "LOG.VAL_PATCHES": 1,
    "LOG.IMAGE_FREQUENCY": 0,
}

# key -> (low, high, high inclusive); low is inclusive.
_IN_RANGE = {
    "DATASET.MIN_LABELED_FRACTION": (0.0, 1.0, True),
    "INFERENCE.MWS_BACKGROUND": (0.0, 1.0, True),
    "INFERENCE.AGGLOMERATION_THRESHOLD": (0.0, 1.0, True),
    "OPTIM.MOMENTUM": (0.0, 1.0, False),
    "MOCO.MOMENTUM": (0.0, 1.0, False),
}

_POSITIVE = (
    "LOSS.DELTA_V", "LOSS.DELTA_D", "OPTIM.INITIAL_LR", "OPTIM.STEP_GAMMA", "MOCO.TEMPERATURE",
    "INFERENCE.MEMORY_BUDGET_GB",
)


def _value(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalars(cfg: CN) -> None:
    """Choices, lower bounds, ranges and strictly positive values of single keys."""
    for key, choices in _CHOICES.items():
        if _value(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {_value(cfg, key)!r}")
    for key, minimum in _AT_LEAST.items():
        if _value(cfg, key) < minimum:
            raise ConfigError(f"{key}: got {_value(cfg, key)}, expected a value >= {minimum}")
    for key, (low, high, inclusive) in _IN_RANGE.items():
        value = _value(cfg, key)
        if not (low <= value <= high if inclusive else low <= value < high):
            raise ConfigError(f"{key}: got {value}, expected a value in [{low}, {high}{']' if inclusive else ')'}")
    for key in _POSITIVE:
        if not _value(cfg, key) > 0:
            raise ConfigError(f"{key}: got {_value(cfg, key)}, expected a value > 0")
    name = str(cfg.LOG.RUN_NAME)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"LOG.RUN_NAME: got {name!r}, expected a folder name without path separators")


def _check_triplet(cfg: CN, key: str, minimum: int, allow_empty: bool = False) -> None:
    value = _value(cfg, key)
    if allow_empty and len(value) == 0:
        return
    if len(value) != 3 or not all(_is_int(v) and v >= minimum for v in value):
        raise ConfigError(f"{key}: got {value!r}, expected 3 integers >= {minimum} (z, y, x)")


def downsampling_factors(cfg: CN) -> tuple[int, int, int]:
    """(z, y, x) factor by which MODEL.FILTERS / MODEL.POOL_Z downsample: sizes must be multiples."""
    z_factor = 2 ** sum(bool(p) for p in cfg.MODEL.POOL_Z)
    xy_factor = 2 ** (len(cfg.MODEL.FILTERS) - 1)
    return z_factor, xy_factor, xy_factor


def _check_model(cfg: CN) -> None:
    """Filters, pooling, input size divisibility and group norm."""
    filters = cfg.MODEL.FILTERS
    if not filters or not all(_is_int(f) and f > 0 for f in filters):
        raise ConfigError(f"MODEL.FILTERS: got {filters!r}, expected a list of positive integers")
    if len(cfg.MODEL.POOL_Z) != len(filters) - 1:
        raise ConfigError(
            f"MODEL.POOL_Z needs one entry per downsampling (len(MODEL.FILTERS) - 1 = {len(filters) - 1}), "
            f"got {cfg.MODEL.POOL_Z!r}"
        )
    factors = downsampling_factors(cfg)
    size = cfg.MODEL.INPUT_SIZE
    if any(s % f for s, f in zip(size, factors)):
        raise ConfigError(
            f"MODEL.INPUT_SIZE {list(size)} must be divisible by {factors}, the downsampling of "
            "MODEL.FILTERS/MODEL.POOL_Z"
        )
    if bool(cfg.MODEL.LSD_HEAD) != (cfg.LOSS.LSD_WEIGHT > 0):
        raise ConfigError(
            f"MODEL.LSD_HEAD {cfg.MODEL.LSD_HEAD} and LOSS.LSD_WEIGHT {cfg.LOSS.LSD_WEIGHT} disagree: the "
            "descriptor head needs LOSS.LSD_WEIGHT > 0 and the descriptor loss needs MODEL.LSD_HEAD true"
        )
    if cfg.MODEL.NORM == "group" and any(f % cfg.MODEL.NORM_GROUPS for f in filters):
        raise ConfigError(
            f"MODEL.NORM_GROUPS {cfg.MODEL.NORM_GROUPS} must divide every MODEL.FILTERS entry {list(filters)}"
        )


def _check_offsets(offsets: Any) -> None:
    """INFERENCE.OFFSETS: integer (dz, dy, dx) triplets, none zero, the 3 nearest neighbours first."""
    if not isinstance(offsets, (list, tuple)) or not all(
        isinstance(o, (list, tuple)) and len(o) == 3 and all(_is_int(v) for v in o) for o in offsets
    ):
        raise ConfigError(f"INFERENCE.OFFSETS: got {offsets!r}, expected a list of [dz, dy, dx] integer triplets")
    for offset in offsets:
        if not any(offset):
            raise ConfigError(f"INFERENCE.OFFSETS: got the zero offset {list(offset)}, expected non-zero offsets")
    nearest = [tuple(abs(v) for v in o) for o in offsets[:3]]
    if sorted(nearest) != [(0, 0, 1), (0, 1, 0), (1, 0, 0)]:
        raise ConfigError(
            f"INFERENCE.OFFSETS: got {[list(o) for o in offsets[:3]]} first, expected the 3 nearest-neighbour "
            "offsets (one per axis, e.g. [-1, 0, 0], [0, -1, 0], [0, 0, -1]) first: they are the attractive edges"
        )


def window_setting(cfg: CN) -> list[int] | None:
    """INFERENCE.WINDOW_SIZE checked: 3 integers, or None for ``auto``; empty / null = MODEL.INPUT_SIZE."""
    value = cfg.INFERENCE.WINDOW_SIZE
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return list(cfg.MODEL.INPUT_SIZE)
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) and v >= 1 for v in value):
        raise ConfigError(f"INFERENCE.WINDOW_SIZE: got {value!r}, expected auto or 3 integers >= 1 (z, y, x)")
    return list(value)


def overlap_setting(cfg: CN) -> list[float] | None:
    """INFERENCE.OVERLAP checked: per axis a fraction in [0, 1) or whole voxels >= 1; None when empty."""
    value = cfg.INFERENCE.OVERLAP
    if len(value) == 0:
        return None

    def valid(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return 0 <= v < 1 or (v >= 1 and float(v).is_integer())

    if len(value) != 3 or not all(valid(v) for v in value):
        raise ConfigError(
            f"INFERENCE.OVERLAP: got {value!r}, expected 3 values (z, y, x), each a fraction of the window "
            "in [0, 1) or a whole number of voxels"
        )
    return [int(v) if v >= 1 else float(v) for v in value]


def check_inference_windows(cfg: CN) -> tuple[list[int] | None, list[int] | None, list[int]]:
    """Checks INFERENCE.WINDOW_SIZE / STRIDE / OVERLAP / MARGIN against the model and the offsets.

    The window (INFERENCE.WINDOW_SIZE, or MODEL.INPUT_SIZE when empty; ``auto`` is planned per volume,
    :mod:`melecole.inference.planner`) must suit the UNet's downsampling; every affinity pair must
    lie inside one cropped window, so per axis stride <= window - 2 * margin - max |offset| (with an
    empty stride: that bound is >= 1). With ``auto`` the stride must be empty (it follows OVERLAP).

    Returns:
        (window or None for auto, stride or None when INFERENCE.STRIDE is empty, margin), each (z, y, x).
    """
    window = window_setting(cfg)
    overlap = overlap_setting(cfg)
    margin = list(cfg.INFERENCE.MARGIN)
    stride = list(cfg.INFERENCE.STRIDE) or None
    if window is None:
        if stride:
            raise ConfigError(
                f"INFERENCE.STRIDE: got {stride} with INFERENCE.WINDOW_SIZE auto, expected empty (the stride "
                "follows INFERENCE.OVERLAP)"
            )
        return None, None, margin
    factors = downsampling_factors(cfg)
    if any(w % f for w, f in zip(window, factors)):
        raise ConfigError(
            f"INFERENCE.WINDOW_SIZE {window} must be divisible by {factors}, the downsampling of "
            "MODEL.FILTERS/MODEL.POOL_Z"
        )
    reach = [max(abs(int(o[a])) for o in cfg.INFERENCE.OFFSETS) for a in range(3)]
    limit = [w - 2 * m - r for w, m, r in zip(window, margin, reach)]
    if overlap is not None and not stride:
        wanted = [int(v) if v >= 1 else math.ceil(v * w) for v, w in zip(overlap, window)]
        bad = [a for a in range(3) if window[a] - max(wanted[a], window[a] - limit[a]) < 1]
        if bad:
            raise ConfigError(
                "INFERENCE.OVERLAP: leaves no stride >= 1 for the window; "
                + "; ".join(f"{'zyx'[a]}: overlap {overlap[a]}, window {window[a]}" for a in bad)
            )
    bad = [a for a in range(3) if (stride[a] > limit[a] if stride else limit[a] < 1)]
    if bad:
        shown = stride or ["auto"] * 3
        raise ConfigError(
            "INFERENCE.STRIDE/INFERENCE.MARGIN: every affinity pair must lie inside one cropped window, "
            "so stride <= window - 2 * margin - max |offset| per axis; "
            + "; ".join(
                f"{'zyx'[a]}: stride {shown[a]}, window {window[a]}, margin {margin[a]}, max offset {reach[a]}"
                for a in bad
            )
        )
    return window, stride, margin


def objective_name(cfg: CN) -> str:
    """The name of the training objective that MOCO.ENABLED / MOCO.MODE select (a key of OBJECTIVE_SELECTION)."""
    for name, values in OBJECTIVE_SELECTION.items():
        if all(_value(cfg, key) == value for key, value in values.items()):
            return name
    keys = dict.fromkeys(key for values in OBJECTIVE_SELECTION.values() for key in values)
    found = ", ".join(f"{key} {_value(cfg, key)!r}" for key in keys)
    valid = "; ".join(
        f"{name} ({', '.join(f'{key} {value}' for key, value in values.items())})"
        for name, values in OBJECTIVE_SELECTION.items()
    )
    raise ConfigError(f"{found} select no training objective; valid: {valid}")


def _check_moco(cfg: CN) -> None:
    objective_name(cfg)  # every valid MOCO.ENABLED / MOCO.MODE pair selects an objective
    moco = cfg.MOCO
    if len(moco.MAX_SHIFT) != 3 or not all(_is_int(v) and v >= 0 for v in moco.MAX_SHIFT):
        raise ConfigError(f"MOCO.MAX_SHIFT: got {moco.MAX_SHIFT!r}, expected 3 integers >= 0 (z, y, x)")
    if moco.ENABLED and cfg.MODEL.NORM == "batch":
        raise ConfigError(
            "MOCO.ENABLED needs MODEL.NORM group, instance or none: batch norm lets queries and keys "
            "cheat through batch statistics (MoCo's shuffle-BN is not implemented)"
        )


# AUGMENTATION.<GROUP>.<KEY> -> (low, high, low inclusive, high inclusive); None = unbounded.
_AUGMENTATION_RANGES = {
    "ELASTIC.ALPHA": (0.0, None, True, False),
    "ELASTIC.SIGMA": (0.0, None, False, False),
    "GRAYSCALE.CONTRAST": (0.0, None, True, False),
    "GRAYSCALE.BRIGHTNESS": (0.0, None, True, False),
    "GRAYSCALE.GAMMA": (0.0, None, True, False),
    "MISSING_SECTION.NUM_SECTIONS": (1, None, True, False),
    "MISSING_PARTS.SIZE": (0.0, 1.0, False, True),
    "MISALIGNMENT.DISPLACEMENT": (0, None, True, False),
    "MISALIGNMENT.SLIP_RATIO": (0.0, 1.0, True, True),
    "MOTION_BLUR.SECTIONS": (1, None, True, False),
    "MOTION_BLUR.KERNEL_SIZE": (1, None, True, False),
    "MOTION_BLUR.SIGMA": (0.0, None, True, False),
    "CUT_BLUR.LENGTH_RATIO": (0.0, 1.0, False, True),
    "NOISE.STD": (0.0, None, True, False),
}


def _in_range(value: float, low: float, high: float | None, low_inclusive: bool, high_inclusive: bool) -> bool:
    above = value >= low if low_inclusive else value > low
    below = high is None or (value <= high if high_inclusive else value < high)
    return above and below


def _check_augmentation(cfg: CN) -> None:
    """Probabilities in [0, 1] and each group's strengths in their ranges."""
    for name, group in cfg.AUGMENTATION.items():
        if isinstance(group, CN) and "P" in group and not 0.0 <= group.P <= 1.0:
            raise ConfigError(f"AUGMENTATION.{name}.P: got {group.P}, expected a probability in [0, 1]")
    for key, (low, high, low_inclusive, high_inclusive) in _AUGMENTATION_RANGES.items():
        value = _value(cfg.AUGMENTATION, key)
        if not _in_range(value, low, high, low_inclusive, high_inclusive):
            interval = f"{'[' if low_inclusive else '('}{low}, {'inf' if high is None else high}"
            interval += "]" if high_inclusive else ")"
            raise ConfigError(f"AUGMENTATION.{key}: got {value}, expected a value in {interval}")
    ratio = cfg.AUGMENTATION.CUT_BLUR.DOWN_RATIO
    if len(ratio) != 2 or not 1.0 <= ratio[0] <= ratio[1]:
        raise ConfigError(
            f"AUGMENTATION.CUT_BLUR.DOWN_RATIO: got {list(ratio)!r}, expected (min, max) with 1 <= min <= max"
        )


def validate_cfg(cfg: CN) -> None:
    """Checks values that the types alone do not (choices, lengths, ranges, cross-key rules)."""
    _check_scalars(cfg)
    for key, minimum, allow_empty in (
        ("MODEL.INPUT_SIZE", 1, False), ("MODEL.STEM_KERNEL", 1, False), ("DATASET.PADDING", 0, False),
        ("INFERENCE.STRIDE", 1, True), ("INFERENCE.MARGIN", 0, False),
        ("INFERENCE.MWS_STRIDES", 1, False), ("LOSS.LSD_RADIUS", 1, False),
    ):
        _check_triplet(cfg, key, minimum, allow_empty)
    _check_model(cfg)
    _check_offsets(cfg.INFERENCE.OFFSETS)
    check_inference_windows(cfg)
    _check_moco(cfg)
    _check_augmentation(cfg)
