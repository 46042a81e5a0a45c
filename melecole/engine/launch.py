"""Entry-point logic shared by melecole/train.py and melecole/train_distributed.py."""

from __future__ import annotations

import argparse

from melecole.config import load_cfg
from melecole.utils.cli import add_config_arguments


def build_train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    parser.set_defaults(config=None)
    for action in parser._actions:
        if action.dest == "config":
            action.required = False
            action.help = "YACS yaml file (required unless --resume), e.g. configs/SNEMI3D-UNet3D.yaml"
    parser.add_argument("--supervised_checkpoint", "--supervised-checkpoint", dest="supervised_checkpoint",
                        help="start from this checkpoint's weights (model-shaping config keys must match)")
    parser.add_argument("--ssl_checkpoint", "--ssl-checkpoint", dest="ssl_checkpoint",
                        help="start from a MOCO.MODE pretrain run's backbone (the heads start fresh)")
    parser.add_argument("--resume", help="run folder or checkpoint to continue exactly (optimizer, iteration, RNG)")
    return parser


def train_from_args(args: argparse.Namespace) -> Trainer:  # noqa: F821
    """Config from the arguments, then one Trainer run. Returns the trainer (for tests)."""
    from melecole.engine.trainer import Trainer, resume_config
    from melecole.errors import ConfigError

    if args.resume:
        if args.supervised_checkpoint or getattr(args, "ssl_checkpoint", None):
            raise ConfigError("--resume excludes --supervised_checkpoint and --ssl_checkpoint")
        cfg, checkpoint = resume_config(args.resume, args.opts)
        trainer = Trainer(cfg, resume_checkpoint=checkpoint)
    else:
        if args.config is None:
            raise ConfigError("--config is required (unless --resume is given)")
        cfg = load_cfg(args.config, args.opts)
        if args.supervised_checkpoint and getattr(args, "ssl_checkpoint", None):
            raise ConfigError("--supervised_checkpoint and --ssl_checkpoint exclude each other")
        ssl_checkpoint = getattr(args, "ssl_checkpoint", None)
        trainer = Trainer(
            cfg, supervised_checkpoint=args.supervised_checkpoint, ssl_checkpoint=ssl_checkpoint
        )
    trainer.train()
    return trainer
