"""Export a trained network for other runtimes: ONNX (ONNX Runtime, OpenVINO, bioimage.io) and TorchScript.

What inference uses of the model is its two outputs (see
:func:`melecole.inference.tta.window_affinities`): ``embedding`` (B, E, z, y, x) and ``foreground``
(B, 1, z, y, x) logits. The model returns them in a dict; exporters want a fixed tuple, so the
exported graph is :class:`InferenceOutputs` around the model:

- input ``raw``: float32 (N, 1, z, y, x) in [0, 1] (uint8 raw divided by 255); the batch axis N is
  dynamic, the window (z, y, x) is fixed to the one exported;
- outputs, in this order: ``embedding`` float32 (N, E, z, y, x) and ``foreground`` float32
  (N, 1, z, y, x) logits (apply a sigmoid for the probability).

Files are written atomically (:func:`melecole.utils.files.atomic_path`): an interrupted export leaves
any earlier file under the final name untouched.

Example::

    model, cfg, _ = build_model_from_checkpoint("run/checkpoints/last.pt")
    export_onnx(model, (24, 128, 128), "model.onnx")
    export_torchscript(model, (24, 128, 128), "model.pt")
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from melecole.utils.files import atomic_path, atomic_write_bytes

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "InferenceOutputs",
    "export_onnx",
    "export_torchscript",
    "onnx_bytes",
]

INPUT_NAME = "raw"
OUTPUT_NAMES = ("embedding", "foreground")
# Opset 17 (ONNX 1.12): read by ONNX Runtime >= 1.12 and OpenVINO >= 2022.3, and by bioimage.io's runners.
DEFAULT_OPSET = 17
EXPORTERS = ("auto", "torchscript", "dynamo")
Exporter = Literal["auto", "torchscript", "dynamo"]

_LOGGER = logging.getLogger(__name__)


class InferenceOutputs(nn.Module):
    """The model as inference sees it: ``raw (N, 1, z, y, x) -> (embedding, foreground)`` (a tuple, not a dict).

    Args:
        model: returns ``{"embedding": (N, E, z, y, x), "foreground": (N, 1, z, y, x)}`` (e.g. UNet3D);
            a DDP/compiled wrapper is unwrapped through its ``module`` / ``_orig_mod`` attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _unwrap(model)

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(raw)
        return outputs["embedding"], outputs["foreground"]


def _unwrap(model: nn.Module) -> nn.Module:
    for attribute in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        while isinstance(getattr(model, attribute, None), nn.Module):
            model = getattr(model, attribute)
    return model


class ExportGroupNorm(nn.Module):
    """GroupNorm (and InstanceNorm) for exported graphs, with statistics that stay exact at large windows.

    ONNX Runtime and OpenVINO compute a GroupNorm's mean and variance as one float32 reduction over
    the whole window, so their rounding error grows with the window: embeddings 6e-6 off torch at
    24x64x64 but 1.8e-3 at 32x256x256 (affinities 1e-3). Here the (centred, two-pass) statistics are
    matrix products, a mean over x and then over the rest, which both runtimes accumulate in blocks:
    3e-6 at 24x248x248, and the graph runs no slower (bench/RESULTS.md, "Forward backends").

    Args:
        groups: number of channel groups (the channel count for an InstanceNorm).
        eps: added to the variance.
        weight, bias: the per-channel affine parameters, or None.
    """

    def __init__(self, groups: int, eps: float, weight: nn.Parameter | None, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.groups, self.eps = int(groups), float(eps)
        self.weight, self.bias = weight, bias

    @staticmethod
    def _mean(values: torch.Tensor) -> torch.Tensor:
        """(N, G, K, x) -> (N, G, 1, 1): the mean over the last two axes as two matrix products."""
        rows = torch.matmul(values, torch.full((values.shape[-1], 1), 1.0 / values.shape[-1], dtype=values.dtype))
        count = rows.shape[-2]
        return torch.matmul(rows.transpose(-1, -2), torch.full((count, 1), 1.0 / count, dtype=values.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        values = x.reshape(x.shape[0], self.groups, -1, x.shape[-1])
        values = values - values[:, :, :1, :1]  # shifted by one sample per group: the sums hold no offset
        values = values - self._mean(values)
        values = (values * torch.rsqrt(self._mean(values * values) + self.eps)).reshape(x.shape)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            values = values * self.weight.reshape(shape)
        if self.bias is not None:
            values = values + self.bias.reshape(shape)
        return values


def _exact_norms(module: nn.Module) -> None:
    """Replaces (in place) every GroupNorm and running-stat-free InstanceNorm by :class:`ExportGroupNorm`."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, ExportGroupNorm(child.num_groups, child.eps, child.weight, child.bias))
        elif isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            setattr(module, name, ExportGroupNorm(child.num_features, child.eps, child.weight, child.bias))
        else:
            _exact_norms(child)


def _cpu_eval_copy(model: nn.Module, exact_norms: bool = False) -> InferenceOutputs:
    """A float32 CPU copy in eval mode (the caller's model is untouched); for ONNX, ``exact_norms``."""
    copied = copy.deepcopy(_unwrap(model)).float().cpu()
    if exact_norms:
        _exact_norms(copied)
    return InferenceOutputs(copied).eval()


def _example_input(window_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    window = [int(size) for size in window_shape]
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"window_shape needs 3 positive sizes (z, y, x), got {list(window_shape)}")
    # Reproducible values in [0, 1]; batch 2 so that no exporter specialises the batch axis to 1.
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch, 1, *window), generator=generator)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silences the exporters' progress prints and deprecation chatter (errors still raise)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def onnx_bytes(
    model: nn.Module, window_shape: Sequence[int], opset: int = DEFAULT_OPSET, exporter: Exporter = "auto"
) -> bytes:
    """The serialised ONNX model of :class:`InferenceOutputs` (see the module docstring for names and axes).

    The batch axis ``N`` is dynamic; the weights are embedded in the bytes.

    Args:
        model: the network (any device, train or eval mode: a CPU float32 eval-mode copy is exported).
        window_shape: (z, y, x) window the graph is fixed to; must suit the model's downsampling.
        opset: ONNX opset (the torch.export-based exporter writes at least 18).
        exporter: ``torchscript`` = torch's TorchScript-based exporter (measured 2.3 s for a small UNet
            where the other took 15 s), ``dynamo`` = the torch.export-based one, ``auto`` = torchscript,
            falling back to dynamo (one logged line) when this torch no longer has it or it fails.

    Raises:
        ValueError: bad ``window_shape`` or ``exporter``.
        RuntimeError: the exporter failed (its message is kept).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
    wrapper = _cpu_eval_copy(model, exact_norms=True)
    example = _example_input(window_shape)
    if exporter in ("auto", "torchscript"):
        try:
            return _torchscript_onnx(wrapper, example, int(opset))
        except Exception as error:  # noqa: BLE001 - any exporter failure: try the other exporter
            if exporter == "torchscript":
                raise RuntimeError(f"ONNX export (torchscript exporter) failed: {error}") from error
            _LOGGER.info("ONNX export: the TorchScript-based exporter failed (%s); using torch.export", error)
    return _dynamo_onnx(wrapper, example, max(int(opset), 18))


def _torchscript_onnx(wrapper: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    dynamic = {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_axes=dynamic,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _dynamo_onnx(wrapper: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    batch = torch.export.Dim("N", min=1, max=1024)
    with _quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_shapes={INPUT_NAME: {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    window_shape: Sequence[int],
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "auto",
) -> Path:
    """Writes the ONNX model of :class:`InferenceOutputs` to ``path`` (atomically) and returns the path.

    Input ``raw`` float32 (N, 1, z, y, x) with a dynamic N; outputs ``embedding`` (N, E, z, y, x) and
    ``foreground`` (N, 1, z, y, x) logits, float32. See :func:`onnx_bytes`.
    """
    data = onnx_bytes(model, window_shape, opset, exporter)
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def export_torchscript(model: nn.Module, window_shape: Sequence[int], path: str | os.PathLike) -> Path:
    """Writes a traced TorchScript module of :class:`InferenceOutputs` to ``path`` (atomically).

    Load it with plain torch: ``torch.jit.load(path)(raw)`` -> ``(embedding, foreground)``. The trace
    is made at batch 2 on ``window_shape`` (the UNet has no data-dependent control flow; any batch
    size works, and other window sizes with the same divisibility too). CPU, float32.
    """
    wrapper = _cpu_eval_copy(model)  # torch's own GroupNorm: exact already
    example = _example_input(window_shape)
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    path = Path(path)
    with atomic_path(path) as temporary, _quiet_exporter():
        torch.jit.save(traced, str(temporary))
    return path
