"""Train a UNet3D embedding model on one device.

    python melecole/train.py --config configs/SNEMI3D-UNet3D.yaml [--supervised_checkpoint CKPT]
                             [--resume RUN_DIR_OR_CKPT] [KEY VALUE ...]
"""

from __future__ import annotations

import sys

from melecole.engine.launch import build_train_parser, train_from_args
from melecole.utils.cli import run_cli


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_train_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    train_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
