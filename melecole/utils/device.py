"""Device selection: CUDA when available, CPU otherwise."""

from __future__ import annotations

import torch

from melecole.errors import ConfigError


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` (HARDWARE.DEVICE) -> a torch.device for this process."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("HARDWARE.DEVICE is 'cuda' but no CUDA device is available (use auto or cpu)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
