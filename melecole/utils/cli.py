"""Helpers shared by the command-line scripts."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Callable

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
            logging.shutdown()
            message = " ".join(str(error).split("\n"))
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and trailing KEY VALUE overrides, as every --config script takes them."""
    parser.add_argument("--config", required=True, help="YACS yaml file, e.g. configs/SNEMI3D-UNet3D.yaml")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, e.g. OPTIM.TOTAL_ITER 1000 HARDWARE.DEVICE cpu",
    )
