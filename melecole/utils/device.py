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


def usable_cpu_count() -> int:
    """Cores this process may run on (affinity mask where the OS has one)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(
    device: torch.device, requested: int = 0, num_workers: int = 0, local_processes: int = 1
) -> int | None:
    """Sets torch's intra-op CPU threads for work on ``device`` (HARDWARE.NUM_THREADS; 0 = auto).

    Auto gives every core to the model, split among the processes on this node, unless
    OMP_NUM_THREADS is set (then torch's choice stands). DataLoader workers are not counted: a worker
    prepares a patch in a small part of a step's time and waits the rest (measured: the loader's
    share of a training step is printed at the end of training, see ``Trainer``), so leaving a core
    to each worker left a 2-core machine training on one thread (1.65x slower). ``num_workers`` is
    kept for the signature; when the loader is the bottleneck, set HARDWARE.NUM_THREADS by hand.
    Returns the number set, or None when nothing was changed (CUDA device, or OMP_NUM_THREADS with
    auto).
    """
    import os

    if device.type != "cpu" or (requested <= 0 and "OMP_NUM_THREADS" in os.environ):
        return None
    del num_workers  # see the docstring
    threads = requested if requested > 0 else max(1, usable_cpu_count() // max(1, local_processes))
    torch.set_num_threads(threads)
    return threads
