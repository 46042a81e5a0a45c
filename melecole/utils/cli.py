"""Helpers shared by the command-line scripts."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from typing import Callable, NoReturn

from melecole.errors import MeLeCoLeError


def run_cli(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wraps a script's ``main(argv)``: a MeLeCoLeError becomes one line on stderr and exit code 2.

    Set MELECOLE_TRACEBACK=1 to see the full traceback for debugging.
    """

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        import os

        try:
            return main(argv) or 0
        except MeLeCoLeError as error:
            if os.environ.get("MELECOLE_TRACEBACK"):
                raise
            for handler in logging.getLogger("melecole").handlers:  # not logging.shutdown(): it would also
                handler.flush()  # close other libraries' handlers (absl's closes a captured stderr)
            message = " ".join(str(error).split("\n"))
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped


def exit_script(code: int) -> NoReturn:
    """Ends a script with ``code``. A SIGTERM that arrives while the interpreter shuts down (torch and
    dask teardown take about a second, after every file was written) then ends the process with
    ``code`` at once, instead of the signal's own exit status -15. Only for the ``__main__`` of a
    script: it changes this process's signal handling for good."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(code))
    sys.exit(code)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and trailing KEY VALUE overrides, as every --config script takes them."""
    parser.add_argument("--config", required=True, help="YACS yaml file, e.g. configs/SNEMI3D-UNet3D.yaml")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. OPTIM.TOTAL_ITER 1000 HARDWARE.DEVICE cpu",
    )
