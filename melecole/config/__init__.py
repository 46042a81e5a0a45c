"""Configuration: defaults <- yaml (with optional _BASE_) <- command-line KEY VALUE pairs."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from melecole.config.defaults import get_default_cfg
from melecole.errors import ConfigError

__all__ = ["load_cfg", "get_default_cfg", "validate_cfg", "cfg_from_yaml_text", "MODEL_SHAPING_KEYS"]

# Keys that change the network's parameters: a checkpoint only loads into a model with equal values.
MODEL_SHAPING_KEYS = (
    "MODEL.ARCHITECTURE",
    "MODEL.IN_CHANNELS",
    "MODEL.FILTERS",
    "MODEL.POOL_Z",
    "MODEL.EMBEDDING_DIMENSION",
    "MODEL.NORM",
    "MODEL.NORM_GROUPS",
    "MODEL.STEM_KERNEL",
)

_CHOICES = {
    "HARDWARE.DEVICE": ("auto", "cpu", "cuda"),
    "MODEL.NORM": ("batch", "instance", "group", "none"),
    "MODEL.ACTIVATION": ("relu", "elu", "leaky_relu", "gelu"),
    "LOSS.NORM": ("l1", "l2"),
    "OPTIM.OPTIMIZER": ("adam", "adamw", "sgd"),
    "OPTIM.SCHEDULER": ("cosine", "constant", "step"),
    "MOCO.MODE": ("joint", "pretrain"),
    "INFERENCE.BLENDING": ("gaussian", "bump", "constant"),
}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file '{path}': YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of config groups, got {type(data).__name__}")
    base = data.pop("_BASE_", None)
    if base is not None:
        base_path = (path.parent / base).resolve()
        merged = _read_yaml(base_path)
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _coerce(value: Any, default: Any, full_key: str, source: str) -> Any:
    """Checks ``value`` against the default's type; ints are accepted for floats, tuples for lists."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(
        f"{source}: {full_key} expects {type(default).__name__} (like {default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


def _merge(cfg: CN, data: dict, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in cfg:
            raise ConfigError(f"{source}: unknown config key '{full_key}'{_suggest(cfg, key, prefix)}")
        current = cfg[key]
        if isinstance(current, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full_key}' is a group of keys, got {value!r}")
            _merge(current, value, source, prefix=f"{full_key}.")
        else:
            cfg[key] = _coerce(value, current, full_key, source)


def _suggest(cfg: CN, key: str, prefix: str) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), [str(k) for k in cfg.keys()], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _opts_to_dict(opts: Sequence[str]) -> dict:
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    nested: dict = {}
    for key, text in zip(opts[0::2], opts[1::2]):
        if key.startswith("-"):
            raise ConfigError(f"command-line override: unknown option '{key}' (overrides are KEY VALUE pairs)")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override: '{key}' conflicts with an earlier override")
        node[parts[-1]] = _parse_value(text)
    return nested


def _check_triplet(cfg: CN, key: str, minimum: int, allow_empty: bool = False) -> None:
    group, name = key.split(".")
    value = cfg[group][name]
    if allow_empty and len(value) == 0:
        return
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise ConfigError(f"{key} expects 3 integers >= {minimum} (z, y, x), got {value!r}")


def validate_cfg(cfg: CN) -> None:
    """Checks values that the types alone do not (choices, lengths, ranges)."""
    for key, choices in _CHOICES.items():
        group, name = key.split(".")
        if cfg[group][name] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {cfg[group][name]!r}")
    _check_triplet(cfg, "MODEL.INPUT_SIZE", 1)
    _check_triplet(cfg, "MODEL.STEM_KERNEL", 1)
    _check_triplet(cfg, "DATASET.PADDING", 0)
    _check_triplet(cfg, "INFERENCE.WINDOW_SIZE", 1, allow_empty=True)
    _check_triplet(cfg, "INFERENCE.STRIDE", 1, allow_empty=True)
    _check_triplet(cfg, "INFERENCE.MARGIN", 0)
    _check_triplet(cfg, "INFERENCE.MWS_STRIDES", 1)
    filters = cfg.MODEL.FILTERS
    if not filters or not all(isinstance(f, int) and f > 0 for f in filters):
        raise ConfigError(f"MODEL.FILTERS expects a list of positive integers, got {filters!r}")
    if len(cfg.MODEL.POOL_Z) != len(filters) - 1:
        raise ConfigError(
            f"MODEL.POOL_Z needs one entry per downsampling (len(MODEL.FILTERS) - 1 = {len(filters) - 1}), "
            f"got {cfg.MODEL.POOL_Z!r}"
        )
    z_factor = 2 ** sum(bool(p) for p in cfg.MODEL.POOL_Z)
    xy_factor = 2 ** (len(filters) - 1)
    size = cfg.MODEL.INPUT_SIZE
    if size[0] % z_factor or size[1] % xy_factor or size[2] % xy_factor:
        raise ConfigError(
            f"MODEL.INPUT_SIZE {list(size)} must be divisible by ({z_factor}, {xy_factor}, {xy_factor}), "
            f"the downsampling of MODEL.FILTERS/MODEL.POOL_Z"
        )
    if cfg.MODEL.NORM == "group" and any(f % cfg.MODEL.NORM_GROUPS for f in filters):
        raise ConfigError(
            f"MODEL.NORM_GROUPS {cfg.MODEL.NORM_GROUPS} must divide every MODEL.FILTERS entry {list(filters)}"
        )
    if cfg.MODEL.EMBEDDING_DIMENSION < 1:
        raise ConfigError(f"MODEL.EMBEDDING_DIMENSION must be >= 1, got {cfg.MODEL.EMBEDDING_DIMENSION}")
    offsets = cfg.INFERENCE.OFFSETS
    if not offsets or not all(isinstance(o, (list, tuple)) and len(o) == 3 for o in offsets):
        raise ConfigError(f"INFERENCE.OFFSETS expects a list of [dz, dy, dx] integer triplets, got {offsets!r}")
    if not any(sum(abs(v) for v in o) == 1 for o in offsets[:3]):
        raise ConfigError("INFERENCE.OFFSETS must start with the 3 nearest-neighbour offsets (attractive edges)")
    for key in ("LOSS.DELTA_V", "LOSS.DELTA_D", "OPTIM.INITIAL_LR", "MOCO.TEMPERATURE"):
        group, name = key.split(".")
        if not cfg[group][name] > 0:
            raise ConfigError(f"{key} must be > 0, got {cfg[group][name]}")
    for key in ("OPTIM.TOTAL_ITER", "OPTIM.BATCH_SIZE", "HARDWARE.NUM_GPUS", "INFERENCE.BATCH_SIZE"):
        group, name = key.split(".")
        if cfg[group][name] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[group][name]}")
    if not 0.0 <= cfg.INFERENCE.MWS_BACKGROUND <= 1.0:
        raise ConfigError(f"INFERENCE.MWS_BACKGROUND must be in [0, 1], got {cfg.INFERENCE.MWS_BACKGROUND}")
    if not 0.0 <= cfg.MOCO.MOMENTUM < 1.0:
        raise ConfigError(f"MOCO.MOMENTUM must be in [0, 1), got {cfg.MOCO.MOMENTUM}")
    if cfg.HARDWARE.NUM_WORKERS < 0:
        raise ConfigError(f"HARDWARE.NUM_WORKERS must be >= 0, got {cfg.HARDWARE.NUM_WORKERS}")


def load_cfg(path: str | os.PathLike | None = None, opts: Iterable[str] | None = None, freeze: bool = True) -> CN:
    """Defaults <- yaml file <- ``opts`` (flat KEY VALUE list), validated and frozen.

    ``LOG.RUN_NAME`` defaults to the config file's stem so run folders are named after the config.
    """
    cfg = get_default_cfg()
    if path is not None:
        path = Path(path)
        _merge(cfg, _read_yaml(path), source=f"config file '{path}'")
        if not cfg.LOG.RUN_NAME:
            cfg.LOG.RUN_NAME = path.stem
    opts = list(opts or [])
    if opts:
        _merge(cfg, _opts_to_dict(opts), source="command-line override")
    if not cfg.LOG.RUN_NAME:
        cfg.LOG.RUN_NAME = "run"
    validate_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def cfg_from_yaml_text(text: str, source: str = "checkpoint") -> CN:
    """Rebuilds a config from the yaml text stored in a run folder or checkpoint."""
    cfg = get_default_cfg()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: stored config is not valid YAML ({error})") from None
    _merge(cfg, data, source=source)
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def cfg_to_yaml_text(cfg: CN) -> str:
    return cfg.dump()
