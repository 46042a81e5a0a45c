"""Train a UNet3D embedding model on one device.

    python melecole/train.py --config configs/SNEMI3D-UNet3D.yaml [--supervised_checkpoint CKPT]
                             [--resume RUN_DIR_OR_CKPT] [KEY VALUE ...]

The same as the ``melecole-train`` console script (:func:`melecole.cli.train.train_main`).
"""

from __future__ import annotations

from melecole.cli import exit_script
from melecole.cli.train import train_main as main

__all__ = ["main"]

if __name__ == "__main__":
    exit_script(main())
