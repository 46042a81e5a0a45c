"""Progress display that suits where the output goes (LOG.PROGRESS_BAR auto | true | false).

On a terminal a tqdm bar; otherwise (SLURM logs, ``> log.txt``) no carriage-return updates, only a
log line every ``log_interval_s`` seconds (or none), so log files stay readable.

    bar = progress_bar(total=len(windows), desc="predict", unit="win", enabled=cfg.LOG.PROGRESS_BAR)
    for item in progress_bar(items, desc="volumes", enabled=None):  # None = auto
        ...
    show = progress_enabled(cfg.LOG.PROGRESS_BAR)  # the same decision as a bool
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

__all__ = ["PROGRESS_CHOICES", "progress_enabled", "progress_bar", "LogProgress"]

PROGRESS_CHOICES = ("auto", "true", "false")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_enabled(setting: str | bool | None = "auto") -> bool:
    """True for "true" (or True), False for "false" (or False); "auto" / None: stderr is a terminal."""
    if isinstance(setting, bool):
        return setting
    if setting is None or str(setting).lower() == "auto":
        return _stderr_is_terminal()
    value = str(setting).lower()
    if value not in PROGRESS_CHOICES:
        raise ValueError(f"progress setting must be one of {', '.join(PROGRESS_CHOICES)}, got {setting!r}")
    return value == "true"


class LogProgress:
    """A tqdm stand-in without a bar: logs ``desc: n/total (rate)`` at most every ``interval_s``.

    ``interval_s`` None logs nothing (for loops that log their own lines). Supports the tqdm subset
    used here: iteration, ``update``, ``set_postfix``, ``close`` and use as a context manager.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        interval_s: float | None = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n = initial
        self.desc = desc
        self.interval_s = interval_s
        self.logger = logger or logging.getLogger("melecole")
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._start_n = initial

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.interval_s is not None and time.monotonic() - self._last >= self.interval_s:
            self._log()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        if self.interval_s is not None and self.n > self._start_n:
            self._log()
        self.interval_s = None  # close once

    def _log(self) -> None:
        now = time.monotonic()
        self._last = now
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        postfix = f" | {self.postfix}" if self.postfix else ""
        self.logger.info("%s: %d%s (%.2f it/s)%s", self.desc or "progress", self.n, total, rate, postfix)


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
    enabled: bool | str | None = None,
    log_interval_s: float | None = 60.0,
    logger: logging.Logger | None = None,
    **tqdm_options: Any,
) -> Any:
    """A tqdm bar when ``enabled``, else a :class:`LogProgress`.

    ``enabled``: a bool, or a LOG.PROGRESS_BAR setting (auto | true | false; None = auto: stderr is a
    terminal). ``tqdm_options`` (e.g. ``unit``, ``leave``) go to tqdm only. Both wrap ``iterable``
    (if given) and support ``update``, ``set_postfix`` and ``close``.
    """
    if progress_enabled(enabled):
        from tqdm import tqdm

        options = {"dynamic_ncols": True, "leave": False, **tqdm_options}
        return tqdm(iterable, total=total, initial=initial, desc=desc, **options)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, interval_s=log_interval_s, logger=logger)
