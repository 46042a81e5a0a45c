"""Rank-aware logging to the console and to <run dir>/log.txt."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "melecole"


def setup_logging(run_dir: str | Path | None = None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configures the ``melecole`` logger: rank 0 logs INFO to stdout and log.txt, others WARNING.

    Safe to call again (handlers are replaced, not stacked).
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if run_dir is not None and rank == 0:
        log_file = logging.FileHandler(Path(run_dir) / "log.txt")
        log_file.setFormatter(formatter)
        logger.addHandler(log_file)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
