"""Forward backends of sliding-window prediction (INFERENCE.BACKEND): where the model's forward pass runs.

A backend is built once per prediction from (model, window, batch size, device, threads) and called
on each batch of windows: ``backend(batch (B, 1, z, y, x) float32) -> {"embedding": (B, E, z, y, x),
"foreground": (B, 1, z, y, x) logits}``, the torch model's outputs, as torch tensors on the batch's
device. Everything after the forward pass (affinities, TTA, blending) stays in torch/numpy.

- ``torch``: the model itself, eager (autocast float16 on CUDA when ``amp``), exactly as before backends.
- ``onnxruntime``: the model exported to ONNX once (:func:`melecole.models.export.onnx_bytes`, in
  memory), run by an ONNX Runtime CPU session with all graph optimisations and torch's thread count.
- ``openvino``: the same ONNX compiled by OpenVINO for the CPU (float32 precision forced: on CPUs with
  bfloat16 units OpenVINO would otherwise lower the precision), torch's thread count; the TTA
  variants of a batch run concurrently as separate infer requests on streams that split the threads.
- ``auto``: on CPU the fastest installed one in :data:`AUTO_ORDER` (measured by
  bench/bench_backends.py), on CUDA torch. A backend that is not installed or fails to export or
  compile is skipped with one logged line.

A CUDA (non-CPU) device always runs torch. The exported/compiled model is cached (the last
:data:`_CACHE_SIZE`) per model object, weights version, window and threads, so that chunked and blockwise
prediction, which call ``predict_volume`` once per chunk or block, export once per process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from melecole.errors import ConfigError

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_CHOICES",
    "Backend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TorchBackend",
    "BackendUnavailable",
    "build_backend",
    "check_backend",
    "concurrent_passes",
]

_LOGGER = logging.getLogger(__name__)
# "auto" on CPU tries these in order, fastest first (bench/bench_backends.py, 2 threads, medulla UNet: openvino
# 10x torch eager at batch 1 and 2.8x at the best batch on 24x64x64 windows, onnxruntime 7.5x and 1.8x).
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
_CACHE_SIZE = 4


class BackendUnavailable(RuntimeError):
    """A backend cannot run here: its package is missing, or the export / compilation failed."""


class Backend(Protocol):
    name: str

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TorchBackend:
    """The torch model, eager, as sliding-window prediction always ran it (float16 autocast on CUDA if ``amp``).

    The caller runs it under ``torch.inference_mode`` with the model in eval mode. Channels-last 3D
    memory format is not used: measured 1.07-1.5x on CPU (bench/bench_backends.py, ``torch-cl3d``,
    contended), far below onnxruntime / openvino, and it changes the rounding (affinities differ by
    2e-5), while ``torch`` must keep earlier results bit for bit.
    """

    name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        window: Sequence[int] = (),
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        amp: bool = True,
        parallel: int = 1,
    ) -> None:
        del window, batch_size, threads, parallel  # any window; torch's own threads; one batch at a time
        self.model = model
        use_amp = amp and torch.device(device).type == "cuda"
        self._autocast = (
            (lambda: torch.autocast(device_type="cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext
        )

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._autocast():
            return self.model(batch)


def _outputs(embedding: np.ndarray, foreground: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "embedding": torch.from_numpy(np.asarray(embedding)).to(device),
        "foreground": torch.from_numpy(np.asarray(foreground)).to(device),
    }


def _numpy_input(batch: torch.Tensor) -> np.ndarray:
    """(B, 1, z, y, x) -> a C-contiguous float32 numpy array (TTA transposes give strided views)."""
    return np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())


class OnnxRuntimeBackend:
    """The model exported to ONNX and run by an ONNX Runtime CPU session (see the module docstring)."""

    name = "onnxruntime"

    def __init__(
        self,
        model: torch.nn.Module,
        window: Sequence[int],
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        amp: bool = True,
        parallel: int = 1,
    ) -> None:
        del batch_size, amp, parallel  # the batch axis is dynamic; float32 on CPU; one run at a time
        self.session = _cached(self.name, model, window, _threads(threads), _onnxruntime_session)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding, foreground = self.session.run(None, {"raw": _numpy_input(batch)})
        return _outputs(embedding, foreground, batch.device)


class OpenVinoBackend:
    """The model's ONNX compiled by OpenVINO for the CPU, float32 (see the module docstring).

    With ``parallel`` > 1 (inputs that are always run together, e.g. the TTA variants of a batch) and
    at least 2 threads, the model is compiled for min(parallel, threads) streams that split the
    threads, and :meth:`run_many` runs the inputs concurrently, one infer request each: on 2 cores the
    two passes of TTA x take 0.80-0.88 of the time of two sequential 2-thread passes
    (bench/RESULTS.md, "Forward backends").
    """

    name = "openvino"

    def __init__(
        self,
        model: torch.nn.Module,
        window: Sequence[int],
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        amp: bool = True,
        parallel: int = 1,
    ) -> None:
        del batch_size, amp
        threads = _threads(threads)
        streams = concurrent_passes(self.name, parallel, threads)
        compiled = _cached(self.name, model, window, threads, _openvino_compiled, streams)
        # One infer request per stream and prediction: requests are not thread-safe, the compiled model is.
        self.requests = [compiled.create_infer_request() for _ in range(streams)]
        # streams > 1: window_affinities hands run_many all TTA variants at once (other backends: one by one)
        self.streams = streams

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        request = self.requests[0]
        request.infer({0: _numpy_input(batch)})
        return self._take(request, batch.device)

    def run_many(self, batches: Sequence[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Outputs in order, ``streams`` batches at a time, without copying them.

        Each output is a view of an infer request's buffers and stays valid until the generator is
        asked for the output after it (the next group reuses the requests): consume each one before
        the next, as window_affinities does. Saves a copy of every output (0.15 s per 64x264x264
        window, 11 % of a TTA x prediction of a 64x512x512 volume; bench/RESULTS.md).
        """
        for first in range(0, len(batches), len(self.requests)):
            group = list(zip(self.requests, batches[first : first + len(self.requests)]))
            for request, batch in group:
                request.start_async({0: _numpy_input(batch)})
            for request, _ in group:
                request.wait()
            for request, batch in group:
                yield self._take(request, batch.device, copy=False)

    @staticmethod
    def _take(request: Any, device: torch.device, copy: bool = True) -> dict[str, torch.Tensor]:
        # __call__ copies: the request reuses its output buffers on the next call.
        embedding, foreground = (request.get_output_tensor(i).data for i in range(2))
        if copy:
            embedding, foreground = embedding.copy(), foreground.copy()
        return _outputs(embedding, foreground, device)


# name -> backend class taking (model, window, batch_size, device, threads, amp).
BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": TorchBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVinoBackend,
}
BACKEND_CHOICES = ("auto", *BACKENDS)
# The package each backend imports (checked before any export).
_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def concurrent_passes(name: str, parallel: int, threads: int) -> int:
    """Forward passes backend ``name`` runs at once for ``parallel`` inputs handed over together (the TTA
    variants): OpenVINO, and ``auto`` (which picks it on CPU), min(parallel, threads); the others one.
    The backend's streams and the planner's memory estimate both follow this rule."""
    if name not in ("auto", "openvino"):
        return 1
    return max(1, min(int(parallel), int(threads)))


def check_backend(name: str) -> str:
    """The backend name (lower case); ConfigError listing the choices for an unknown one."""
    text = str(name).strip().lower()
    if text not in BACKEND_CHOICES:
        choices = ", ".join(BACKEND_CHOICES)
        raise ConfigError(f"INFERENCE.BACKEND: {name!r} is not a forward backend; expected one of {choices}")
    return text


def _threads(threads: int | None) -> int:
    return int(threads) if threads and threads > 0 else torch.get_num_threads()


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[name]) is not None


def build_backend(
    name: str,
    model: torch.nn.Module,
    window: Sequence[int],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    amp: bool = True,
    parallel: int = 1,
) -> Backend:
    """The forward backend ``name`` (auto | torch | onnxruntime | openvino) for one prediction.

    Args:
        name: INFERENCE.BACKEND. ``auto``: torch on a non-CPU device, else the first of
            :data:`AUTO_ORDER` that is installed and exports/compiles (each skip logs one line).
        model: the torch model, in eval mode, on ``device``.
        window: (z, y, x) window the backend will be called on (ONNX graphs are fixed to it).
        batch_size: windows per call (the last batch may be smaller).
        device: where prediction runs; anything but CPU runs torch.
        threads: CPU threads of onnxruntime / openvino; None or 0 = torch's current thread count.
        amp: float16 autocast for torch on CUDA.
        parallel: inputs always run together through ``run_many`` (the TTA variants); openvino runs
            up to that many concurrently, each on its share of the threads.

    Raises:
        ConfigError: unknown name, or an explicitly named backend whose package is not installed.
        BackendUnavailable: an explicitly named backend failed to export or compile the model.
    """
    name = check_backend(name)
    device = torch.device(device)
    window = [int(size) for size in window]
    if device.type != "cpu" or name == "torch":
        if name not in ("auto", "torch"):
            _LOGGER.info("INFERENCE.BACKEND %s runs on CPU only; using torch on %s", name, device)
        return TorchBackend(model, window, batch_size, device, threads, amp, parallel=parallel)
    if name != "auto":
        if not _installed(name):
            installed = ", ".join(choice for choice in BACKENDS if _installed(choice))
            raise ConfigError(
                f"INFERENCE.BACKEND: {name!r} needs the Python package {_PACKAGES[name]!r}, which is not installed "
                f"(pip install {_PACKAGES[name]}); expected an installed backend: auto, {installed}"
            )
        return BACKENDS[name](model, window, batch_size, device, threads, amp, parallel=parallel)
    for candidate in AUTO_ORDER:
        if not _installed(candidate):
            _LOGGER.info("INFERENCE.BACKEND auto: %s is not installed; trying the next backend", candidate)
            continue
        try:
            return BACKENDS[candidate](model, window, batch_size, device, threads, amp, parallel=parallel)
        except BackendUnavailable as error:
            _LOGGER.warning("INFERENCE.BACKEND auto: %s unavailable (%s); trying the next backend", candidate, error)
    return TorchBackend(model, window, batch_size, device, threads, amp, parallel=parallel)


# ------------------------------------------------------------------------------------------------
# Export / compile once per (model, weights, window, threads): chunked and blockwise prediction call
# predict_volume once per chunk/block with the same model.

_CACHE: OrderedDict[tuple, tuple[weakref.ref, Any]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _weights_version(model: torch.nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place (load_state_dict, training)."""
    return tuple((tensor.data_ptr(), tensor._version) for tensor in model.state_dict(keep_vars=True).values())


def _cached(
    name: str,
    model: torch.nn.Module,
    window: Sequence[int],
    threads: int,
    build: Callable[[bytes, int, int], Any],
    streams: int = 1,
) -> Any:
    """``build(onnx bytes, threads, streams)`` for this model, cached; BackendUnavailable when export/build fails."""
    key = (name, id(model), _weights_version(model), tuple(int(size) for size in window), threads, streams)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0]() is model:
            _CACHE.move_to_end(key)
            return entry[1]
        from melecole.models.export import onnx_bytes

        try:
            compiled = build(onnx_bytes(model, window), threads, streams)
        except Exception as error:  # noqa: BLE001 - any exporter/runtime failure makes the backend unavailable
            raise BackendUnavailable(f"{name} could not run the model: {type(error).__name__}: {error}") from error
        _CACHE[key] = (weakref.ref(model), compiled)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return compiled


def _onnxruntime_session(data: bytes, threads: int, streams: int = 1) -> Any:
    import onnxruntime

    del streams  # one session run at a time
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _openvino_compiled(data: bytes, threads: int, streams: int = 1) -> Any:
    import openvino

    core = openvino.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    if streams > 1:  # concurrent requests (run_many), the threads split between the streams
        config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
    else:
        config["PERFORMANCE_HINT"] = "LATENCY"
    return core.compile_model(core.read_model(data), "CPU", config)
