"""Runs the block tasks on an engine: dask.distributed (LocalCluster or a scheduler) or in-process.

The only module that knows dask. Passes run one after the other (fragments -> graph -> agglomerate ->
relabel); inside a pass blocks run in parallel, in whatever order the engine likes. A progress bar
counts blocks, and each pass ends with one summary line (blocks, seconds, Mvoxel/s).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from melecole.blockwise.output import (
    OutputTarget,
    absolute_url,
    check_flags,
    check_target,
    clear_work_folder,
    commit_output,
    complete_line,
    output_state,
    output_target,
)
from melecole.blockwise.plan import BlockwiseOptions
from melecole.blockwise.tasks import (
    BlockwiseJob,
    agglomerate_task,
    fragments_task,
    graph_task,
    import_block_functions,
    is_done,
    json_safe,
    prepare_workdir,
    relabel_task,
    worker_memory_bytes,
)
from melecole.errors import DataError
from melecole.io.ownership import OutputLock
from melecole.io.volumes import VolumeURL, open_volume
from melecole.utils.progress import progress_bar

__all__ = [
    "SerialExecutor",
    "DaskExecutor",
    "dask_executor",
    "PassSummary",
    "run_job",
    "run_pass",
    "report_dashboard",
    "plan_job",
    "segment_blockwise",
    "work_folder",
]

logger = logging.getLogger(__name__)


class SerialExecutor:
    """Runs tasks one after the other in this process (tests, debugging, a one-core machine)."""

    dashboard = None

    def map(self, function: Callable[[int], Any], items: Sequence[int]) -> Iterator[Any]:
        for item in items:
            yield function(item)


class DaskExecutor:
    """Submits tasks to a dask ``Client``; a task lost with its worker is rerun by dask.

    A task's one-line error (:class:`melecole.errors.MeLeCoLeError`, e.g. NaN in an input block) comes
    back as a :class:`DaskExecutor.Failure` value and is raised here, in the driver, as it was raised in
    the worker (which then logs no "Compute Failed" traceback for it).
    """

    # LocalCluster start (:func:`dask_executor`): workers start in rounds of as many as there are CPU
    # cores (a worker takes ~0.6 s of an idle core to start; more at once only compete for the cores),
    # all within START_SECONDS + START_SECONDS_PER_ROUND x rounds.
    START_SECONDS = 30.0
    START_SECONDS_PER_ROUND = 3.0
    # Memory of the driver process (README, memory rule of thumb), added to the workers'.
    DRIVER_BYTES = 0.3e9

    @dataclass(frozen=True)
    class Failure:
        """A task's one-line error, returned by the worker instead of raised."""

        error: Exception

    def __init__(self, client: Any):
        self.client = client

    @property
    def dashboard(self) -> str | None:
        """The dashboard URL, or None when the scheduler serves none (e.g. bokeh is not installed)."""
        try:
            services = self.client.scheduler_info().get("services", {})
        except Exception:  # an old or unusual scheduler: no dashboard to report
            return None
        return self.client.dashboard_link if "dashboard" in services else None

    @staticmethod
    def call(function: Callable[[int], Any], item: int) -> Any:
        """``function(item)`` in a worker; a MeLeCoLeError is returned as a :class:`Failure`."""
        from melecole.errors import MeLeCoLeError

        try:
            return function(item)
        except MeLeCoLeError as error:
            return DaskExecutor.Failure(error)

    def map(self, function: Callable[[int], Any], items: Sequence[int]) -> Iterator[Any]:
        """Results of ``function(item)`` as they finish; the first task's one-line error is raised (the
        tasks not yet run are cancelled, those running finish: each writes and marks only its block)."""
        import uuid

        from dask.utils import funcname
        from distributed import as_completed

        items = list(items)
        name, token = funcname(function), uuid.uuid4().hex[:8]
        futures = self.client.map(
            functools.partial(DaskExecutor.call, function), items, key=[f"{name}-{item}-{token}" for item in items]
        )
        try:
            for future in as_completed(futures):
                result = future.result()
                if isinstance(result, DaskExecutor.Failure):
                    raise result.error
                yield result
        finally:
            for future in futures:
                future.release()

    @staticmethod
    async def _identity(address: str, timeout: float) -> Any:
        """dask's identity call to ``address``: connect, handshake, ask (no step bounded by dask itself)."""
        from distributed.comm import connect
        from distributed.security import Security

        # As the Client would connect (TLS settings from the dask config); retried until 0.9 x timeout.
        arguments = Security().get_connection_args("client")
        comm = await connect(address, timeout=0.9 * timeout, **arguments)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    @staticmethod
    def probe(address: str, timeout: float) -> dict[str, Any]:
        """What answers at ``address``, within ``timeout`` seconds in all (a service that accepts the
        connection but never answers dask's handshake, such as an HTTP server, would make dask's own
        Client wait forever; another protocol's greeting read as a dask frame asks for exabytes).

        Returns:
            The scheduler's identity (``workers``: the workers connected now).

        Raises:
            DataError: one line: nothing answered, not in dask's protocol, or not a scheduler.
        """
        import asyncio
        import threading

        outcome: dict[str, Any] = {}

        def ask() -> None:
            try:
                outcome["identity"] = asyncio.run(asyncio.wait_for(DaskExecutor._identity(address, timeout), timeout))
            except BaseException as error:  # reported below, in the caller's thread
                outcome["error"] = error

        thread = threading.Thread(target=ask, name="melecole-scheduler-probe", daemon=True)
        thread.start()
        thread.join(timeout + 2.0)  # the thread itself is bounded; this is the hard deadline
        identity, error = outcome.get("identity"), outcome.get("error")
        if isinstance(identity, dict) and identity.get("type") == "Scheduler":
            return identity
        if isinstance(identity, dict):
            reason = f"a dask {identity.get('type', 'service')} answered, not a scheduler"
        elif error is None or isinstance(error, TimeoutError):  # connected, then silence (or no connection)
            reason = "no answer in dask's protocol"
        elif isinstance(error, OSError):
            cause = f": {error.__cause__}" if error.__cause__ is not None and str(error.__cause__) else ""
            reason = " ".join(f"{error}{cause}".split()) or type(error).__name__
        else:
            text = " ".join(str(error).split())[:120]
            reason = f"the service there does not speak dask's protocol: {type(error).__name__}: {text}"
        raise DataError(
            f"--scheduler '{address}': no dask scheduler answered within {timeout:g} s ({reason[:200]}), "
            "expected the address of a running scheduler (tcp://HOST:PORT)"
        )

    @staticmethod
    def capacity_warning(workers: int, worker_memory: float | None) -> str | None:
        """One warning line when ``workers`` exceed the CPU cores or, by the memory rule of thumb
        (``worker_memory`` bytes per worker, plus the driver), the memory available now; else None."""
        import os

        import psutil

        cpus = os.cpu_count() or 1
        reasons = []
        if workers > cpus:
            reasons.append(f"more than the {cpus} CPU cores (the others only wait, take memory and slow the start)")
        if worker_memory:
            need = workers * worker_memory + DaskExecutor.DRIVER_BYTES
            available = psutil.virtual_memory().available
            if need > available:
                reasons.append(
                    f"~{need / 1e9:.1f} GB by the memory rule of thumb ({worker_memory / 1e9:.2f} GB per worker for "
                    f"this block and fragment mode, plus the driver), more than the {available / 1e9:.1f} GB available"
                )
        if not reasons:
            return None
        return f"warning: --workers {workers}: {'; '.join(reasons)}; expected fewer --workers (or a smaller --block)"

    @staticmethod
    def start_limit(workers: int) -> float:
        """Seconds the LocalCluster's ``workers`` may take to start (see :attr:`START_SECONDS`)."""
        import os

        rounds = -(-workers // (os.cpu_count() or 1))
        return DaskExecutor.START_SECONDS + DaskExecutor.START_SECONDS_PER_ROUND * rounds

    class StartFailures(logging.Filter):
        """Keeps off the terminal the tracebacks that tornado logs for workers that failed to start (e.g.
        killed by a SIGTERM to the whole process group); the first reason is kept for the error line."""

        def __init__(self) -> None:
            super().__init__()
            self.reasons: list[str] = []

        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if error is None or "failed to start" not in str(error):
                return True
            cause = error.__cause__ or error
            self.reasons.append(f"{type(cause).__name__}: {' '.join(str(cause).split())[:120]}")
            return False

    @staticmethod
    def local_cluster(stack: contextlib.ExitStack, workers: int) -> Any:
        """A Client of a new LocalCluster with ``workers`` started (closed by ``stack``), its worker
        processes started with SIGINT blocked.

        Raises:
            DataError: not all workers started within :meth:`start_limit`.
        """
        import signal
        from multiprocessing import resource_tracker

        import dask
        from distributed import Client, LocalCluster

        failures = DaskExecutor.StartFailures()
        tornado_log = logging.getLogger("tornado.application")
        tornado_log.addFilter(failures)
        stack.callback(tornado_log.removeFilter, failures)
        stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment()}))
        # The cluster's event-loop thread, and so every worker process it spawns, inherits this mask.
        # (Started from that thread, multiprocessing's resource tracker would unblock SIGINT there.)
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            # death_timeout bounds each worker's start, so closing never waits on one that hangs. The
            # driver reports what fails (one line); the workers' and scheduler's own logs stay quiet.
            cluster = stack.enter_context(LocalCluster(
                n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.CRITICAL, death_timeout=DaskExecutor.start_limit(workers),
            ))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        client = stack.enter_context(Client(cluster))
        DaskExecutor.start_workers(cluster, client, workers, failures.reasons)
        return client

    @staticmethod
    def start_workers(cluster: Any, client: Any, workers: int, reasons: Sequence[str] = ()) -> None:
        """Starts ``workers`` on a LocalCluster in rounds of as many as there are CPU cores.

        Raises:
            DataError: not all started within :meth:`start_limit` (the message says how many did).
        """
        import os

        cpus = os.cpu_count() or 1
        rounds = -(-workers // cpus)
        limit = DaskExecutor.start_limit(workers)
        deadline = time.monotonic() + limit
        for count in range(1, rounds + 1):
            target = min(count * cpus, workers)
            cluster.scale(target)
            try:
                client.wait_for_workers(target, timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                started = len(client.nthreads())
                why = f" ({reasons[0]})" if reasons else ""
                raise DataError(
                    f"--workers {workers}: only {started} of {workers} dask workers started within {limit:g} s{why} "
                    f"on this machine ({cpus} CPU cores), expected fewer --workers (at most {cpus})"
                ) from None


# glibc malloc of the worker processes. dask's default pre-spawn environment sets only
# MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold at 128 kB: every array of a
# block then comes from a fresh mmap and is page-faulted in again, which made the passes ~30-40 %
# slower, and two workers side by side slower still (bench/RESULTS.md, blockwise speed). These values
# are where glibc's own adaptive thresholds settle (arrays under 32 MiB reuse freed memory).
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}
DASK_DEFAULT_TRIM = "65536"


def worker_environment() -> dict[str, Any]:
    """Environment of the LocalCluster's worker processes, set before they start: dask's pre-spawn
    environment with one thread per worker (the block functions are single-threaded numpy / C++, and
    zarr's default decoding pool would make N workers on N cores oversubscribe) and
    :data:`MALLOC_ENVIRONMENT` unless ``distributed.nanny.pre-spawn-environ`` was given another
    MALLOC_TRIM_THRESHOLD_ than dask's default. As always with dask, a variable already in this
    process's environment wins over these values."""
    import dask

    environment = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}))
    if str(environment.get("MALLOC_TRIM_THRESHOLD_", DASK_DEFAULT_TRIM)) == DASK_DEFAULT_TRIM:
        environment.update(MALLOC_ENVIRONMENT)
    threads = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ZARR_THREADING__MAX_WORKERS")
    environment.update(dict.fromkeys(threads, 1))
    return environment


@contextlib.contextmanager
def dask_executor(
    workers: int = 2,
    scheduler: str | None = None,
    timeout: float = 10.0,
    *,
    report: Callable[[str], None] | None = None,
    worker_memory: float | None = None,
) -> Iterator[DaskExecutor]:
    """A :class:`DaskExecutor` on a new LocalCluster (``workers`` processes, one thread each) or on the
    scheduler at ``scheduler`` (e.g. ``tcp://10.0.0.1:8786``, or one started by dask-jobqueue).

    The LocalCluster's workers start in rounds within a limit that grows with their number
    (:attr:`DaskExecutor.START_SECONDS`); a warning line comes first when they outnumber the CPU cores or
    (``worker_memory``: bytes per worker by the memory rule of thumb,
    :func:`melecole.blockwise.tasks.worker_memory_bytes`) the available memory. The worker processes
    start with SIGINT blocked: a Ctrl-C reaches only this process, which closes the cluster (no
    tracebacks of workers interrupted while they start).

    Args:
        report: where the warning and the "workers started" lines go (default: this module's logger).

    Raises:
        ConfigError: ``timeout`` is not a positive number of seconds.
        DataError: no scheduler answered at ``scheduler`` within ``timeout`` seconds, or not all
            workers started in time.
    """
    import math

    from distributed import Client

    from melecole.errors import ConfigError

    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        shown = f"{timeout:g}" if isinstance(timeout, (int, float)) else repr(timeout)
        raise ConfigError(f"--scheduler-timeout: {shown}, expected a positive number of seconds")
    warn = report or logger.warning
    say = report or logger.info
    if scheduler:
        identity = DaskExecutor.probe(scheduler, timeout)
        try:
            client = Client(scheduler, timeout=f"{timeout}s")
        except Exception as error:  # the probe answered, then the connection failed: still one line
            reason = " ".join(str(error).split()) or type(error).__name__
            raise DataError(
                f"--scheduler '{scheduler}': no dask scheduler answered within {timeout:g} s ({reason[:160]}), "
                "expected the address of a running scheduler (tcp://HOST:PORT)"
            ) from None
        with client:
            say(f"dask: scheduler {scheduler} with {len(identity.get('workers', {}))} workers")
            yield DaskExecutor(client)
        return
    warning = DaskExecutor.capacity_warning(int(workers), worker_memory)
    if warning:
        warn(warning)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        client = DaskExecutor.local_cluster(stack, int(workers))
        # Import the block functions in every worker now, so the first pass's time is the work's.
        client.run(import_block_functions)
        plural = "s" if int(workers) != 1 else ""
        say(f"dask: {int(workers)} worker{plural} started in {time.perf_counter() - start:.1f} s")
        yield DaskExecutor(client)


@dataclass(frozen=True)
class PassSummary:
    """One pass: blocks run (``skipped`` were already done), wall seconds, voxels covered."""

    name: str
    blocks: int
    skipped: int
    seconds: float
    voxels: int

    def line(self) -> str:
        rate = self.voxels / self.seconds / 1e6 if self.seconds > 0 else 0.0
        skipped = f" ({self.skipped} already done, skipped)" if self.skipped else ""
        return f"{self.name}: {self.blocks} blocks in {self.seconds:.1f} s, {rate:.2f} Mvoxel/s{skipped}"


def run_pass(
    job: Any, name: str, task: Callable[[Any, int], Any], executor: Any, progress: Any,
    report: Callable[[str], None],
) -> PassSummary:
    """Runs ``task(job, i)`` for every block i not marked done (``job.plan``, ``job.path``: a
    :class:`BlockwiseJob` or a :class:`melecole.blockwise.predict.PredictionJob`)."""
    total = job.plan.num_blocks if name != "agglomerate" else 1
    todo = [index for index in range(total) if not is_done(job, name, index)]
    skipped = total - len(todo)
    if skipped:
        report(f"{name}: resuming, {skipped} of {total} blocks already done")
    start = time.perf_counter()
    voxels = 0
    results = executor.map(functools.partial(task, job), todo)
    bar = progress_bar(results, total=len(todo), desc=name, unit="block", enabled=progress if todo else False)
    for result in bar:
        voxels += result if isinstance(result, int) else 0
    if name == "agglomerate":
        voxels = int(job.shape[0]) * int(job.shape[1]) * int(job.shape[2]) if todo else 0
    summary = PassSummary(name, len(todo), skipped, time.perf_counter() - start, voxels)
    report(summary.line())
    return summary


PASSES: tuple[tuple[str, Callable[[BlockwiseJob, int], Any]], ...] = (
    ("fragments", fragments_task),
    ("graph", graph_task),
    ("agglomerate", agglomerate_task),
    ("relabel", relabel_task),
)


def run_job(
    job: BlockwiseJob, executor: Any, *, progress: Any = True, report: Callable[[str], None] = print
) -> list[PassSummary]:
    """Runs every pass of ``job`` (skipping blocks already marked done) on ``executor``."""
    prepare_workdir(job)
    return [run_pass(job, name, task, executor, progress, report) for name, task in PASSES]


# ------------------------------------------------------------------------------- inputs / output


def work_folder(output: VolumeURL) -> Path:
    """The work folder of an output: a hidden sibling of the zarr root."""
    return OutputTarget(output.path, output).workdir


def _check_inputs(
    affinities_url: str, foreground_url: str | None, offsets: Sequence[Sequence[int]]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, resolution) of the inputs; one-line DataError for a missing or mismatched input."""
    affinities = open_volume(affinities_url)
    if affinities.ndim != 4:
        raise DataError(f"{affinities.url}: shape {list(affinities.shape)}, expected (C, Z, Y, X) affinities")
    if affinities.shape[0] != len(offsets):
        raise DataError(
            f"{affinities.url}: {affinities.shape[0]} channels, expected {len(offsets)} "
            "(one per INFERENCE.OFFSETS entry of the config)"
        )
    shape = tuple(int(s) for s in affinities.shape[1:])
    if foreground_url:
        foreground = open_volume(foreground_url)
        if tuple(foreground.shape) != shape:
            raise DataError(
                f"{foreground.url}: shape {list(foreground.shape)}, expected the affinities' (Z, Y, X) {list(shape)}"
            )
    resolution = affinities.resolution or (1.0, 1.0, 1.0)
    return shape, tuple(resolution)  # type: ignore[return-value]


def report_dashboard(executor: Any, report: Callable[[str], None]) -> None:
    """Prints the dask dashboard address when the executor has one."""
    if executor.dashboard:
        hint = "" if importlib.util.find_spec("bokeh") else " (pip install bokeh for its plots)"
        report(f"dask dashboard: {executor.dashboard}{hint}")


def plan_job(
    affinities_url: str,
    output_url: str,
    options: BlockwiseOptions,
    *,
    foreground_url: str | None = None,
    inputs: Mapping[str, str | None] | None = None,
) -> tuple[BlockwiseJob, OutputTarget]:
    """Checks inputs and output (nothing is created) -> the job and its output.

    ``inputs``: further inputs ({flag: URL}) the output must stay apart from (``infer.py``'s raw).

    Raises:
        DataError / ConfigError: missing or mismatched inputs, an output that is not zarr, overlaps an
            input or lies in a folder that cannot be written.
    """
    target = output_target(output_url)
    shape, resolution = _check_inputs(affinities_url, foreground_url, options.offsets)
    check_target(target, {"--affinities": affinities_url, "--foreground": foreground_url, **(inputs or {})})
    job = BlockwiseJob(
        absolute_url(affinities_url), absolute_url(foreground_url), str(target.workdir), shape,  # type: ignore[arg-type]
        options, resolution,
    )
    return job, target


def segment_blockwise(
    affinities_url: str,
    output_url: str,
    options: BlockwiseOptions,
    *,
    foreground_url: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    scheduler_timeout: float = 10.0,
    resume: bool = False,
    overwrite: bool = False,
    progress: Any = True,
    executor: Any = None,
    report: Callable[[str], None] = print,
    inputs: Mapping[str, str | None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> list[PassSummary]:
    """Segments stored affinities block by block into a zarr segmentation (``python -m melecole.blockwise``).

    Args:
        affinities_url: (C, Z, Y, X) affinities (HDF5 ``file:key``, zarr, precomputed), C = len(offsets).
        output_url: zarr output (``x.zarr`` or ``x.zarr:key``), uint64, chunks = options.output_chunks.
        options: see :func:`melecole.blockwise.plan.build_options`.
        foreground_url: optional (Z, Y, X) foreground probability (same store types).
        workers: LocalCluster processes (ignored with ``scheduler`` or ``executor``).
        scheduler: address of a running dask scheduler instead of a LocalCluster.
        scheduler_timeout: seconds to wait for ``scheduler`` to answer.
        resume: finish an interrupted run (blocks marked done are skipped).
        overwrite: replace an existing output that MeLeCoLe wrote and discard an interrupted run.
        progress: bars over blocks (a bool or a LOG.PROGRESS_BAR setting: auto = only on a terminal).
        executor: run on this executor (e.g. :class:`SerialExecutor`) instead of dask.
        report: where the dashboard address and summary lines go.
        inputs: further inputs the output must stay apart from ({flag: URL}).
        provenance: recorded in the output's fingerprint too (``infer.py --blockwise``: the prediction).

    Returns:
        One :class:`PassSummary` per pass ([] when ``resume`` finds the output complete).

    Raises:
        DataError / ConfigError: one line, before any work (see :mod:`melecole.blockwise.output`).
    """
    check_flags(resume, overwrite, scheduler_timeout if executor is None else None)
    job, target = plan_job(affinities_url, output_url, options, foreground_url=foreground_url, inputs=inputs)
    fingerprint = json_safe({**job.manifest(), **({"prediction": provenance} if provenance else {})})
    with OutputLock(target.workdir, target.what, report):
        state = output_state(target, json_safe(job.manifest()), fingerprint, resume=resume, overwrite=overwrite)
        if state == "complete":
            report(complete_line(target))
            return []
        report(
            f"{job.plan.num_blocks} blocks of {list(options.block_shape)} over {list(job.shape)}, "
            f"{options.segmentation.fragments} fragments, {options.segmentation.agglomeration} agglomeration"
        )
        with contextlib.ExitStack() as stack:
            if executor is None:
                memory = worker_memory_bytes(options.block_shape, options.halo, options.segmentation.fragments)
                executor = stack.enter_context(
                    dask_executor(workers, scheduler, scheduler_timeout, report=report, worker_memory=memory)
                )
                report_dashboard(executor, report)
            summaries = run_job(job, executor, progress=progress, report=report)
        commit_output(job.output_path, target, fingerprint)
        clear_work_folder(target.workdir, target.what)
    report(f"segmentation: {target.final}")
    return summaries
