"""Multi-process training with the one training engine: one process per GPU, or CPU processes.

Two ways in, both ending in ``train_from_args`` (so there is one training loop):

- **Launched here** (``launch``): HARDWARE.NUM_GPUS processes are spawned on this node. The parent
  hosts the rendezvous store on a socket bound to 127.0.0.1 with a port picked by the OS (no fixed
  address, no race for the port), then watches the workers: the first one that fails stops the
  others and the parent reports which rank failed and why.
- **Under torchrun** (``is_torchrun_environment``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT are set, so this process joins that launch (``init_method="env://"``); torchrun stops
  the other workers when one fails. This is the way to train on several nodes.

NCCL with one GPU per process on CUDA; gloo on CPU (HARDWARE.DEVICE cpu, or no CUDA).

Workers leave deterministically: barrier, destroy the process group, flush, then ``os._exit``,
which skips the interpreter teardown in which gloo's threads sometimes abort ("terminate called
without an active exception"). A MeLeCoLeError in a rank is reported as one line.

Environment variables (read when a worker starts, never at import):
    MELECOLE_DIST_TIMEOUT: process-group timeout in seconds (default 1800); a collective that waits
        longer fails instead of hanging.
    MELECOLE_TEST_FAIL_RANK: test hook, ``RANK`` or ``RANK:ITERATION``: that rank raises a
        MeLeCoLeError when it reaches that training iteration (default 0). Used by the tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.multiprocessing.spawn import ProcessException
from yacs.config import CfgNode as CN

from melecole.errors import ConfigError, MeLeCoLeError
from melecole.utils.device import resolve_device

__all__ = [
    "RankFailure",
    "is_torchrun_environment",
    "select_backend",
    "process_group_timeout",
    "launch",
    "train_distributed",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "MELECOLE_DIST_TIMEOUT"
FAIL_HOOK_VARIABLE = "MELECOLE_TEST_FAIL_RANK"
DEFAULT_TIMEOUT_S = 1800.0
LOCALHOST = "127.0.0.1"
# After Ctrl-C, workers get this long to finish (rank 0 saves last.pt) before they are killed.
INTERRUPT_GRACE_S = 60.0

WorkerFunction = Callable[[Any], Any]


class RankFailure(Exception):
    """A worker process failed; raised by ``launch`` in the parent after stopping the others.

    Attributes:
        rank: the rank that failed first.
        exit_code: its exit code (negative: killed by that signal).
        message: its error (one line for a MeLeCoLeError, else the traceback), or how it died.
        user_error: True when the rank raised a MeLeCoLeError (bad config, data, checkpoint).
    """

    def __init__(self, rank: int, exit_code: int, message: str, user_error: bool = False) -> None:
        super().__init__(f"rank {rank} failed (exit code {exit_code}): {message}")
        self.rank = rank
        self.exit_code = exit_code
        self.message = message
        self.user_error = user_error


# ----------------------------------------------------------------------------------------------
# Environment and process group
# ----------------------------------------------------------------------------------------------
def is_torchrun_environment(environ: dict[str, str] | None = None) -> bool:
    """True when all of torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) are set."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in TORCHRUN_VARIABLES)


def select_backend(device: str) -> str:
    """``nccl`` when HARDWARE.DEVICE resolves to CUDA, ``gloo`` otherwise (cpu, or no CUDA)."""
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def process_group_timeout() -> datetime.timedelta:
    """Process-group timeout from MELECOLE_DIST_TIMEOUT (seconds), default 30 minutes."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_VARIABLE} must be a number of seconds, got {value!r}") from None
    return datetime.timedelta(seconds=seconds)


def _open_rendezvous(world_size: int) -> tuple[dist.TCPStore, int]:
    """A TCPStore server in this process, listening on 127.0.0.1 at a port the OS picked.

    The socket is bound before the store takes it over, so no other process can take the port
    between picking and binding it. Returns the store (keep it alive) and its port.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOCALHOST, 0))
    listener.listen(max(16, world_size))
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        LOCALHOST, port, world_size, is_master=True, wait_for_workers=False,
        timeout=process_group_timeout(), master_listen_fd=listener.fileno(),
    )
    listener.detach()  # the store owns (and closes) the socket now
    return store, port


def _shutdown_and_exit(exit_code: int) -> NoReturn:
    """Leaves a worker deterministically.

    On success all ranks meet at a barrier (so none closes its connections while another still
    works), then the group is destroyed. Logs and streams are flushed and the process ends with
    ``os._exit``: the interpreter's teardown, in which gloo threads sometimes abort, never runs.
    """
    if exit_code == 0 and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as error:  # a peer died after the last step: report, do not hang
            print(f"error: shutting down the process group failed: {error}", file=sys.stderr)
            exit_code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code)


def _run_worker(body: Callable[[], Any], rank: int, error_dir: str | None) -> NoReturn:
    """Runs ``body()`` (process-group setup + work) in a worker, records any error, exits.

    With ``error_dir`` (spawned by ``launch``) the error goes to ``rank<R>.json`` there and the
    parent prints it; without (torchrun) it is printed to stderr here.
    """
    exit_code, message, user_error = 0, "", False
    try:
        _install_failure_hook(rank)
        body()
    except MeLeCoLeError as error:
        exit_code, user_error = 2, True
        message = " ".join(str(error).split())
    except KeyboardInterrupt:
        exit_code, message = 130, "interrupted"
    except BaseException:  # noqa: B036 - any failure must reach the parent, then exit
        exit_code, message = 1, traceback.format_exc()
    if exit_code:
        if error_dir is None:
            print(f"error: rank {rank}: {message}" if user_error else f"rank {rank} failed:\n{message}",
                  file=sys.stderr)
        else:
            record = {"rank": rank, "time": time.time(), "exit_code": exit_code, "message": message,
                      "user_error": user_error}
            path = Path(error_dir) / f"rank{rank}.json"
            path.with_suffix(".tmp").write_text(json.dumps(record))
            path.with_suffix(".tmp").replace(path)
    _shutdown_and_exit(exit_code)


def _spawned_worker(
    local_rank: int, function: WorkerFunction, argument: Any, world_size: int, port: int, backend: str,
    error_dir: str,
) -> NoReturn:
    """Entry point of a process started by ``launch`` (one node: rank = local rank)."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))

    def body() -> None:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # CPU threads are shared out by the Trainer (HARDWARE.NUM_THREADS)
        timeout = process_group_timeout()
        store = dist.TCPStore(LOCALHOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=local_rank, world_size=world_size, timeout=timeout)
        function(argument)

    _run_worker(body, local_rank, error_dir)


# ----------------------------------------------------------------------------------------------
# Launching and watching the workers
# ----------------------------------------------------------------------------------------------
def launch(function: WorkerFunction, argument: Any, world_size: int, backend: str = "gloo") -> None:
    """Runs ``function(argument)`` in ``world_size`` spawned processes that form a process group.

    ``function`` must be importable (a module-level function) and ``argument`` picklable. Returns
    when every worker finished. If one fails, the others are stopped (SIGTERM, then SIGKILL after
    30 s) and ``RankFailure`` names the rank that failed first and its error.
    """
    if world_size < 1:
        raise ConfigError(f"need at least 1 process, got {world_size}")
    store, port = _open_rendezvous(world_size)
    with tempfile.TemporaryDirectory(prefix="melecole-dist-") as error_dir:
        context = torch_mp.start_processes(
            _spawned_worker, args=(function, argument, world_size, port, backend, error_dir),
            nprocs=world_size, join=False, start_method="spawn",
        )
        try:
            while not context.join(timeout=1.0):
                pass
        except ProcessException as error:  # join() has already stopped the others
            raise _first_failure(error, Path(error_dir)) from None
        except KeyboardInterrupt:
            _stop_processes(context.processes, INTERRUPT_GRACE_S)
            raise
        finally:
            del store


def _first_failure(error: ProcessException, error_dir: Path) -> RankFailure:
    """The root cause: a rank that dies first often makes its peers fail too.

    The earliest recorded error wins, unless the rank ``join`` saw fail left no record because a
    signal killed it (segfault, out of memory): then the peers' errors are its consequences.
    """
    records = {record["rank"]: record for record in
               (json.loads(path.read_text()) for path in error_dir.glob("rank*.json"))}
    exit_code = int(getattr(error, "exit_code", None) or 1)
    signal_name = getattr(error, "signal_name", None)
    if records and (error.error_index in records or not signal_name):
        first = min(records.values(), key=lambda record: record["time"])
        return RankFailure(first["rank"], first["exit_code"], first["message"].rstrip(), first["user_error"])
    how = f"killed by signal {signal_name}" if signal_name else f"exit code {exit_code}, no error recorded"
    return RankFailure(error.error_index, exit_code, how)


def _stop_processes(processes: list, grace_s: float) -> None:
    """Waits up to ``grace_s`` for the processes to end, then terminates and finally kills them."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _install_failure_hook(rank: int) -> None:
    """Test hook (MELECOLE_TEST_FAIL_RANK=RANK[:ITERATION]): that rank's Trainer raises mid-run."""
    spec = os.environ.get(FAIL_HOOK_VARIABLE, "")
    if not spec:
        return
    fail_rank, _, iteration = spec.partition(":")
    if int(fail_rank) != rank:
        return
    from melecole.engine import trainer as trainer_module

    fail_at = int(iteration or 0)

    class FailingTrainer(trainer_module.Trainer):
        def run_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
            if self.iteration >= fail_at:
                raise MeLeCoLeError(
                    f"rank {rank} fails at iteration {self.iteration} ({FAIL_HOOK_VARIABLE} test hook)"
                )
            return super().run_step(batch)

    trainer_module.Trainer = FailingTrainer


# ----------------------------------------------------------------------------------------------
# train_distributed.py
# ----------------------------------------------------------------------------------------------
def _train_worker(args: argparse.Namespace) -> None:
    from melecole.engine.launch import train_from_args

    train_from_args(args)


def _launch_config(args: argparse.Namespace) -> CN:
    """The run's config, read in the launcher to choose the processes and the backend early."""
    from melecole.config import load_cfg
    from melecole.engine.trainer import resume_config

    if args.resume:
        if args.supervised_checkpoint:
            raise ConfigError("--resume and --supervised_checkpoint exclude each other")
        return resume_config(args.resume, args.opts)[0]
    if args.config is None:
        raise ConfigError("--config is required (unless --resume is given)")
    return load_cfg(args.config, args.opts)


def train_distributed(args: argparse.Namespace) -> int:
    """Trains with the arguments of ``build_train_parser``; returns the exit code.

    Under torchrun this process is one worker (it never returns: workers leave with ``os._exit``).
    Otherwise HARDWARE.NUM_GPUS processes are launched (one: trained in this process). A failed
    rank is reported on stderr: one line for a MeLeCoLeError (exit code 2), else its traceback
    (exit code 1). Config errors found before launching raise MeLeCoLeError.
    """
    from melecole.utils.logger import setup_logging

    cfg = _launch_config(args)
    backend = select_backend(cfg.HARDWARE.DEVICE)
    if is_torchrun_environment():
        local_rank = int(os.environ["LOCAL_RANK"])

        def body() -> None:
            if backend == "nccl":
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            dist.init_process_group(backend, init_method="env://", timeout=process_group_timeout())
            _train_worker(args)

        _run_worker(body, int(os.environ["RANK"]), error_dir=None)

    world_size = int(cfg.HARDWARE.NUM_GPUS)
    if world_size < 1:
        raise ConfigError(f"HARDWARE.NUM_GPUS must be >= 1, got {world_size}")
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ConfigError(
            f"HARDWARE.NUM_GPUS is {world_size} but {torch.cuda.device_count()} CUDA device(s) are visible "
            "(lower HARDWARE.NUM_GPUS, or use HARDWARE.DEVICE cpu for CPU processes)"
        )
    if world_size == 1:
        _train_worker(args)
        return 0
    logger = setup_logging(None, rank=0)
    logger.info("launching %d %s processes (rendezvous on %s)", world_size, backend, LOCALHOST)
    try:
        launch(_train_worker, args, world_size, backend)
    except RankFailure as failure:
        if failure.user_error:
            print(f"error: rank {failure.rank}: {failure.message}", file=sys.stderr)
            return 2
        print(f"error: rank {failure.rank} failed ({_describe_exit(failure.exit_code)}); the other ranks "
              f"were stopped. Its error:\n{failure.message}", file=sys.stderr)
        return 1
    return 0


def _describe_exit(exit_code: int) -> str:
    return f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
