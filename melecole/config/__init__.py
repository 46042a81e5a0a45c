"""Configuration: defaults <- yaml (with optional _BASE_) <- command-line KEY VALUE pairs."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from melecole.config.defaults import get_default_cfg
from melecole.config.validate import check_inference_windows, downsampling_factors, validate_cfg
from melecole.errors import ConfigError

__all__ = [
    "MODEL_SHAPING_KEYS",
    "apply_overrides",
    "cfg_from_yaml_text",
    "check_inference_windows",
    "downsampling_factors",
    "get_default_cfg",
    "load_cfg",
    "validate_cfg",
]

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

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}': not a text (UTF-8 YAML) file, expected a .yaml config") from None
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


class _CommandLineText(str):
    """A command-line value: its text, and ``parsed``, the Python literal it spells (if any).

    A key whose default is a string takes the text as typed (``LOG.RUN_NAME 2024`` is the name
    "2024"); every other key takes the parsed value.
    """

    parsed: Any


def _coerce(value: Any, default: Any, full_key: str, source: str) -> Any:
    """Checks ``value`` against the default's type; ints are accepted for floats, tuples for lists.

    String keys also take numbers (a yaml ``RUN_NAME: 2024``) and booleans (``false``) as text.
    """
    if isinstance(value, _CommandLineText):
        keep_text = isinstance(default, str) and not isinstance(value.parsed, bool)
        value = str(value) if keep_text else value.parsed
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
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, int):
            return str(value)
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
            # A key whose default is None takes several types (INFERENCE.WINDOW_SIZE: auto or [z, y, x]):
            # a value is checked against the default, not against what an earlier yaml set.
            like = None if full_key in _free_type_keys() else current
            cfg[key] = _coerce(value, like, full_key, source)


def _free_type_keys() -> frozenset[str]:
    """Full names of the keys whose default is None (their validation is in ``config.validate``)."""
    global _FREE_TYPE_KEYS
    if _FREE_TYPE_KEYS is None:
        found: set[str] = set()

        def walk(node: CN, prefix: str) -> None:
            for name, item in node.items():
                if isinstance(item, CN):
                    walk(item, f"{prefix}{name}.")
                elif item is None:
                    found.add(f"{prefix}{name}")

        walk(get_default_cfg(), "")
        _FREE_TYPE_KEYS = frozenset(found)
    return _FREE_TYPE_KEYS


_FREE_TYPE_KEYS: frozenset[str] | None = None


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
    flags = [item for item in opts if item.startswith("--")]
    if flags:
        raise ConfigError(
            f"command-line override: got the option '{flags[0]}' among the KEY VALUE pairs, "
            "expected options before the KEY VALUE overrides"
        )
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
        value = _CommandLineText(text)
        value.parsed = _parse_value(text)
        node[parts[-1]] = value
    return nested


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
    opts = [str(item) for item in opts or []]
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
    if not isinstance(data, dict):
        found = f"{type(data).__name__} {str(data)[:40]!r}"
        raise ConfigError(f"{source}: got {found}, expected a mapping of config groups")
    _merge(cfg, data, source=source)
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def apply_overrides(cfg: CN, opts: Iterable[str] | None, source: str = "command-line override") -> CN:
    """A validated, frozen copy of ``cfg`` with the flat ``KEY VALUE`` list ``opts`` merged in."""
    merged = cfg.clone()
    merged.defrost()
    opts = [str(item) for item in opts or []]
    if opts:
        _merge(merged, _opts_to_dict(opts), source=source)
    validate_cfg(merged)
    merged.freeze()
    return merged
