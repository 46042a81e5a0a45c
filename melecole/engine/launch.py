"""Launching worker processes for multi-process training (one per GPU, or CPU processes).

Two ways in, both running one function per rank (``melecole.cli.train`` passes the training one):

- **Launched here** (``launch``): ``world_size`` processes are spawned on this node. The parent
  hosts the rendezvous store on a socket bound to 127.0.0.1 with a port picked by the OS (no fixed
  address, no race for the port), then watches the workers: the first one that fails stops the
  others and the parent reports which rank failed and why. Each worker watches its parent: when
  the launcher dies (even by kill -9) the worker gets SIGTERM (training saves last.pt, as on
  Ctrl-C) and is gone within ``PARENT_GRACE_S`` seconds. (On Linux torch's spawn also asks the
  kernel for a SIGINT on parent death; the watchdog covers other systems and a worker that does
  not stop on that signal.)
- **Under torchrun** (``is_torchrun_environment``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT are set, so this process joins that launch (``run_torchrun_worker``); torchrun stops
  the other workers when one fails. This is the way to train on several nodes.

NCCL with one GPU per process on CUDA; gloo on CPU (HARDWARE.DEVICE cpu, or no CUDA).

Workers leave deterministically: barrier, destroy the process group, flush, then ``os._exit``,
which skips the interpreter teardown in which gloo's threads sometimes abort ("terminate called
without an active exception"). A MeLeCoLeError in a rank is reported as one line.

Environment variable (read when a worker starts, never at import):
    MELECOLE_DIST_TIMEOUT: process-group timeout in seconds (default 1800); a collective that waits
        longer fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.multiprocessing.spawn import ProcessException

from melecole.errors import ConfigError, MeLeCoLeError
from melecole.utils.device import resolve_device
from melecole.utils.files import atomic_write_text

__all__ = [
    "RankFailure",
    "is_torchrun_environment",
    "select_backend",
    "process_group_timeout",
    "launch",
    "run_torchrun_worker",
    "sigterm_as_interrupt",
    "StepInterrupt",
    "interrupt_between_steps",
    "watch_parent",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_VARIABLE = "MELECOLE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
LOCALHOST = "127.0.0.1"
# After Ctrl-C, workers get this long to finish (rank 0 saves last.pt) before they are killed.
INTERRUPT_GRACE_S = 60.0
# After the launcher died, a worker gets this long to save and leave after SIGTERM, then exits.
PARENT_GRACE_S = 20.0
PARENT_POLL_S = 1.0

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


@contextlib.contextmanager
def sigterm_as_interrupt(forward_to: Callable[[], list] | None = None) -> Iterator[None]:
    """Inside the block SIGTERM (SLURM, Kubernetes, ``docker stop``) raises KeyboardInterrupt, as
    Ctrl-C does, so the same path saves last.pt and leaves cleanly. Main thread only.

    ``forward_to``: returns processes that get SIGTERM first (a launcher's workers; Ctrl-C in a
    terminal reaches them by itself, a SIGTERM to the launcher does not).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        for process in forward_to() if forward_to is not None else []:
            if process.is_alive():
                process.terminate()
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StepInterrupt:
    """Ctrl-C / SIGTERM while training: the step under way finishes, then :meth:`requested` says stop.

    A KeyboardInterrupt in the middle of a step (inside ``optimizer.step``, between it and the
    scheduler, or in a checkpoint write) would save a state no uninterrupted run ever had, and the
    resumed run would differ. A second signal stops at once (a step that does not end), if it comes
    ``REPEAT_AFTER_S`` or more after the first: a signal to a whole process group (SLURM's scancel,
    ``kill -- -PGID``) reaches a rank directly and again, milliseconds later, through its launcher,
    and that is one request, not two.
    """

    REPEAT_AFTER_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.signals = 0
        self.clock = clock
        self.first_at = 0.0

    def handler(self, signum: int, frame: Any) -> None:
        now = self.clock()
        if self.signals == 0:
            self.first_at = now
        self.signals += 1
        if self.signals > 1 and now - self.first_at >= self.REPEAT_AFTER_S:
            raise KeyboardInterrupt(f"signal {signum}, twice")

    def requested(self, device: Any = "cpu") -> bool:
        """True once a signal came; with a process group, once it came to any rank (all ranks stop
        after the same step, so no rank waits in a collective for one that left)."""
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(self.signals > 0)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return self.signals > 0


@contextlib.contextmanager
def interrupt_between_steps() -> Iterator[StepInterrupt]:
    """Inside the block SIGINT and SIGTERM only set :class:`StepInterrupt`'s flag (main thread; in
    other threads the flag stays down and the signals keep their handlers)."""
    interrupt = StepInterrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    previous = {number: signal.signal(number, interrupt.handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupt
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


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
            atomic_write_text(Path(error_dir) / f"rank{rank}.json", json.dumps(record))
    _shutdown_and_exit(exit_code)


def watch_parent(parent_pid: int) -> None:
    """Starts a daemon thread that stops this worker when its launcher (``parent_pid``) is gone.

    SIGTERM first (training saves last.pt and leaves, as on Ctrl-C); if the worker is still alive
    ``PARENT_GRACE_S`` later (e.g. blocked in a collective with a dead peer), it exits at once.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GRACE_S)
        os._exit(143)

    threading.Thread(target=watch, name="melecole-parent-watchdog", daemon=True).start()


def _spawned_worker(
    local_rank: int, function: WorkerFunction, argument: Any, world_size: int, port: int, backend: str,
    error_dir: str,
) -> NoReturn:
    """Entry point of a process started by ``launch`` (one node: rank = local rank)."""
    watch_parent(os.getppid())
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
            with sigterm_as_interrupt(forward_to=lambda: context.processes):
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


def run_torchrun_worker(function: WorkerFunction, argument: Any, backend: str) -> NoReturn:
    """Runs ``function(argument)`` as one worker of a torchrun launch (its variables are set); exits."""
    local_rank = int(os.environ["LOCAL_RANK"])

    def body() -> None:
        if backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method="env://", timeout=process_group_timeout())
        function(argument)

    _run_worker(body, int(os.environ["RANK"]), error_dir=None)


def describe_exit(exit_code: int) -> str:
    """'signal N' for a negative exit code (killed by a signal), else 'exit code N'."""
    return f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
