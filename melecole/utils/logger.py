"""Rank-aware logging to the console and to <run dir>/log.txt."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOGGER_NAME = "melecole"
# Records kept before the run folder exists (written to log.txt once it does).
_EARLY_RECORDS = 10000


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted, not the stream of the moment the
    handler was made (a tool or test that replaced and closed ``sys.stdout`` would get logging errors)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(
    run_dir: str | Path | None = None, rank: int = 0, level: int = logging.INFO, keep_early: bool = False
) -> logging.Logger:
    """Configures the ``melecole`` logger: rank 0 logs INFO to stdout and log.txt, others WARNING.

    ``keep_early`` (without ``run_dir``): rank 0 keeps its records in memory until
    :func:`attach_log_file` names the run folder, so log.txt also holds what was logged before the
    folder was made. Safe to call again (handlers are replaced, not stacked).
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", datefmt="%H:%M:%S")
    console = _StdoutHandler()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if rank == 0:
        if run_dir is not None:
            _add_file_handler(logger, Path(run_dir), formatter)
        elif keep_early:
            logger.addHandler(logging.handlers.MemoryHandler(_EARLY_RECORDS, flushLevel=logging.CRITICAL + 1))
    return logger


def _add_file_handler(logger: logging.Logger, run_dir: Path, formatter: logging.Formatter) -> logging.Handler:
    log_file = logging.FileHandler(run_dir / "log.txt")
    log_file.setFormatter(formatter)
    logger.addHandler(log_file)
    return log_file


def attach_log_file(run_dir: str | Path) -> None:
    """Starts <run_dir>/log.txt (appending) with the records kept since :func:`setup_logging`."""
    logger = logging.getLogger(LOGGER_NAME)
    memory = [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    if not memory:
        return
    formatter = logger.handlers[0].formatter
    log_file = _add_file_handler(logger, Path(run_dir), formatter)
    for handler in memory:
        for record in handler.buffer:
            log_file.handle(record)
        logger.removeHandler(handler)
        handler.buffer.clear()
        handler.close()


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
