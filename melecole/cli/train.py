"""Command lines of training: argument parsing, config, then one Trainer run.

``train_main`` serves ``melecole/train.py`` and the ``melecole-train`` console script;
``train_distributed_main`` serves ``melecole/train_distributed.py`` and ``melecole-train-distributed``
(it launches processes with :mod:`melecole.engine.launch`, each running ``train_worker``, which is
module level so that spawned processes can import it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch
from yacs.config import CfgNode as CN

from melecole.config import load_cfg
from melecole.engine.launch import (
    LOCALHOST,
    RankFailure,
    describe_exit,
    is_torchrun_environment,
    launch,
    run_torchrun_worker,
    select_backend,
    sigterm_as_interrupt,
)
from melecole.errors import ConfigError
from melecole.utils.cli import add_config_arguments, run_cli
from melecole.utils.logger import setup_logging

__all__ = [
    "build_train_parser",
    "train_from_args",
    "train_worker",
    "train_distributed",
    "train_main",
    "train_distributed_main",
]

TRAIN_USAGE = """Train a UNet3D embedding model on one device.

    melecole-train --config configs/SNEMI3D-UNet3D.yaml [--supervised_checkpoint CKPT]
                   [--resume RUN_DIR_OR_CKPT] [KEY VALUE ...]
"""

TRAIN_DISTRIBUTED_USAGE = """Train on HARDWARE.NUM_GPUS processes of one node, or as one worker of a torchrun launch.

    melecole-train-distributed --config configs/SNEMI3D-UNet3D.yaml HARDWARE.NUM_GPUS 4 [KEY VALUE ...]

One process per GPU (NCCL), or CPU processes with HARDWARE.DEVICE cpu (gloo). OPTIM.BATCH_SIZE is
per process. Under torchrun, HARDWARE.NUM_GPUS is ignored and this process joins that launch.
"""


def build_train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _check_arguments(args: argparse.Namespace) -> None:
    """Options that exclude each other, and --config unless --resume."""
    ssl_checkpoint = getattr(args, "ssl_checkpoint", None)
    if args.resume:
        if args.supervised_checkpoint or ssl_checkpoint:
            raise ConfigError("--resume excludes --supervised_checkpoint and --ssl_checkpoint")
        if args.config is not None:
            raise ConfigError(
                f"--config '{args.config}' given with --resume, expected one of them: a resumed run keeps its "
                "stored config (change keys with KEY VALUE overrides)"
            )
    elif args.config is None:
        raise ConfigError("--config is required (unless --resume is given)")
    elif args.supervised_checkpoint and ssl_checkpoint:
        raise ConfigError("--supervised_checkpoint and --ssl_checkpoint exclude each other")


def _resume_or_load(args: argparse.Namespace) -> tuple[CN, dict | None]:
    """(config, checkpoint to resume or None) from the arguments."""
    from melecole.engine.trainer import resume_config

    _check_arguments(args)
    if args.resume:
        return resume_config(args.resume, args.opts)
    return load_cfg(args.config, args.opts), None


def _nothing_to_do(cfg: CN, checkpoint: dict | None) -> bool:
    """True (and says so) when a resumed run is already at OPTIM.TOTAL_ITER or beyond."""
    if checkpoint is None or int(checkpoint["iteration"]) < cfg.OPTIM.TOTAL_ITER:
        return False
    print(
        f"nothing to do: '{checkpoint['path']}' is at iteration {checkpoint['iteration']} and OPTIM.TOTAL_ITER is "
        f"{cfg.OPTIM.TOTAL_ITER} (raise OPTIM.TOTAL_ITER to train on); no file was changed",
        file=sys.stderr,
    )
    return True


def train_from_args(args: argparse.Namespace) -> Any:
    """Config from the arguments, then one Trainer run. Returns the trainer (None: nothing to do)."""
    from melecole.engine.trainer import Trainer

    cfg, checkpoint = _resume_or_load(args)
    if _nothing_to_do(cfg, checkpoint):
        return None
    trainer = Trainer(
        cfg,
        resume_checkpoint=checkpoint,
        supervised_checkpoint=args.supervised_checkpoint,
        ssl_checkpoint=getattr(args, "ssl_checkpoint", None),
    )
    trainer.train()
    return trainer


def train_worker(args: argparse.Namespace) -> None:
    """What each launched process runs: ``train_from_args`` (module level, so spawn can import it)."""
    train_from_args(args)


def train_distributed(args: argparse.Namespace, worker: Callable[[Any], Any] = train_worker) -> int:
    """Trains with the arguments of ``build_train_parser`` in several processes; returns the exit code.

    Under torchrun this process is one worker (it never returns: workers leave with ``os._exit``).
    Otherwise HARDWARE.NUM_GPUS processes run ``worker(args)`` (one: in this process). A failed
    rank is reported on stderr: one line for a MeLeCoLeError (exit code 2), else its traceback
    (exit code 1). Config errors found before launching raise MeLeCoLeError.
    """
    cfg, checkpoint = _resume_or_load(args)
    if _nothing_to_do(cfg, checkpoint):
        return 0
    backend = select_backend(cfg.HARDWARE.DEVICE)
    if is_torchrun_environment():
        run_torchrun_worker(worker, args, backend)
    world_size = int(cfg.HARDWARE.NUM_GPUS)
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ConfigError(
            f"HARDWARE.NUM_GPUS is {world_size} but {torch.cuda.device_count()} CUDA device(s) are visible "
            "(lower HARDWARE.NUM_GPUS, or use HARDWARE.DEVICE cpu for CPU processes)"
        )
    if world_size == 1:
        worker(args)
        return 0
    logger = setup_logging(None, rank=0)
    logger.info("launching %d %s processes (rendezvous on %s)", world_size, backend, LOCALHOST)
    try:
        launch(worker, args, world_size, backend)
    except RankFailure as failure:
        if failure.user_error:
            print(f"error: rank {failure.rank}: {failure.message}", file=sys.stderr)
            return 2
        print(f"error: rank {failure.rank} failed ({describe_exit(failure.exit_code)}); the other ranks "
              f"were stopped. Its error:\n{failure.message}", file=sys.stderr)
        return 1
    return 0


@run_cli
def train_main(argv: list[str] | None = None) -> int:
    """``melecole-train`` / ``python melecole/train.py``. SIGTERM leaves like Ctrl-C (exit 130)."""
    args = build_train_parser(TRAIN_USAGE).parse_args(argv)
    with sigterm_as_interrupt():
        train_from_args(args)
    return 0


@run_cli
def train_distributed_main(argv: list[str] | None = None) -> int:
    """``melecole-train-distributed`` / ``python melecole/train_distributed.py``. SIGTERM leaves like
    Ctrl-C (exit 130; launched workers get it too)."""
    args = build_train_parser(TRAIN_DISTRIBUTED_USAGE).parse_args(argv)
    with sigterm_as_interrupt():
        return train_distributed(args)
