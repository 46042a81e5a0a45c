"""Inference options: built once from the config, frozen, passed down.

Only :func:`build_predict_options` reads the prediction config (the segmentation's:
:func:`melecole.segmentation.options.build_segmentation_options`); every other
inference function takes these objects (or plain arguments), so a test or another scheduler can
drive prediction and segmentation without a config. The cache fingerprint of stored predictions is
:meth:`PredictOptions.fingerprint` plus the checkpoint's content hash (:mod:`melecole.inference.outputs`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from melecole.config.validate import check_inference_windows, downsampling_factors, overlap_setting
from melecole.inference.planner import (
    WindowRequest,
    activation_bytes_per_voxel,
    plan_block_windows,
    plan_windows,
)
from melecole.inference.tta import TTAVariant, parse_tta
from melecole.utils.offsets import offset_reach

__all__ = [
    "PredictOptions",
    "build_predict_options",
    "default_stride",
    "resolve_windows",
    "window_request",
]

Triplet = tuple[int, int, int]


def default_stride(window: Sequence[int], margin: Sequence[int], offsets: Sequence[Sequence[int]]) -> list[int]:
    """Half the window, lowered where needed so that every pair lies in one cropped window.

    Coverage needs stride <= window - 2 * margin - max |offset| along each axis; the result is at
    least 1 (if even 1 is too large, prediction reports the axis).
    """
    reach = offset_reach(offsets)
    return [max(1, min(w // 2, w - 2 * m - r)) for w, m, r in zip(window, margin, reach)]


def window_request(cfg: Any) -> WindowRequest:
    """What INFERENCE.WINDOW_SIZE / STRIDE / OVERLAP / MARGIN / BATCH_SIZE / MEMORY_BUDGET_GB ask for,
    with the model's factors and estimated memory per window voxel (checked by the config's rules)."""
    window, stride, margin = check_inference_windows(cfg)
    offsets = cfg.INFERENCE.OFFSETS
    variants = len(parse_tta(cfg.INFERENCE.TTA, window))
    return WindowRequest(
        window=tuple(window) if window is not None else None,
        stride=tuple(stride) if stride else None,
        overlap=tuple(overlap_setting(cfg)) if overlap_setting(cfg) is not None else None,
        margin=tuple(margin),
        reach=offset_reach(offsets),
        factors=downsampling_factors(cfg),
        batch_size=int(cfg.INFERENCE.BATCH_SIZE),
        memory_budget=float(cfg.INFERENCE.MEMORY_BUDGET_GB) * 1e9,
        bytes_per_voxel=activation_bytes_per_voxel(
            cfg.MODEL.FILTERS, cfg.MODEL.POOL_Z, cfg.MODEL.EMBEDDING_DIMENSION, len(offsets), variants,
            concurrent=_concurrent_passes(cfg, variants),
        ),
        square_yx="t" in str(cfg.INFERENCE.TTA).lower(),
        output_bytes_per_voxel=4.0 * (len(offsets) + 1),
    )


def _concurrent_passes(cfg: Any, variants: int) -> int:
    """Forward passes one window may have in flight (:func:`melecole.inference.backends.concurrent_passes`)."""
    from melecole.inference.backends import concurrent_passes
    from melecole.utils.device import usable_cpu_count

    return concurrent_passes(str(cfg.INFERENCE.BACKEND), variants, int(cfg.HARDWARE.NUM_THREADS) or usable_cpu_count())


def resolve_windows(cfg: Any) -> tuple[list[int], list[int], list[int]]:
    """(window, stride, margin) from INFERENCE.* / MODEL.INPUT_SIZE, before any volume is known.

    Window: INFERENCE.WINDOW_SIZE or MODEL.INPUT_SIZE; with ``auto`` the block plan
    (:func:`melecole.inference.planner.plan_block_windows`). Stride: INFERENCE.STRIDE; else from
    INFERENCE.OVERLAP; else half the window, lowered where needed so that every affinity pair lies in
    one cropped window (stride <= window - 2 * margin - max |offset| per axis). The checks are the
    config's own (:func:`melecole.config.validate.check_inference_windows`, run by ``load_cfg``).

    Raises:
        ConfigError: the window does not suit the model, or stride/margin leave pairs uncovered.
    """
    request = window_request(cfg)
    plan = plan_block_windows(request)
    return list(plan.window), list(plan.stride), list(request.margin)


def _predictor_takes(name: str) -> bool:
    """Whether :func:`melecole.inference.sliding_window.predict_volume` has the keyword ``name``.

    Read from the loaded module (whoever passes these keywords has imported it; importing it here
    would be a cycle, since it imports this module); False when it is not loaded.
    """
    import inspect
    import sys

    module = sys.modules.get("melecole.inference.sliding_window")
    return module is not None and name in inspect.signature(module.predict_volume).parameters


@dataclass(frozen=True)
class PredictOptions:
    """How a checkpoint's model is run over a volume and its embeddings turned into affinities.

    Attributes:
        window, stride, margin: sliding-window geometry (z, y, x); see :func:`resolve_windows`.
        offsets: C affinity offsets (dz, dy, dx).
        delta_d, norm: embeddings -> affinities (LOSS.DELTA_D, LOSS.NORM).
        blending: per-window weight profile (gaussian | bump | constant).
        batch_size: windows per forward pass.
        device: where the model runs ("cpu", "cuda:0").
        amp: autocast (float16) on CUDA.
        num_threads: CPU threads for torch (HARDWARE.NUM_THREADS; 0 = auto).
        tta: test-time augmentation spec (INFERENCE.TTA: "none" or letters from "zyxt",
            :func:`melecole.inference.tta.parse_tta`).
        backend: where the forward pass runs (INFERENCE.BACKEND: auto | torch | onnxruntime |
            openvino); passed to ``predict_volume`` when it takes a ``backend`` argument.
        request: what the config asked for (:class:`~melecole.inference.planner.WindowRequest`);
            window / stride / batch_size above are its plan without a volume (the block plan, used
            block by block) until :meth:`plan_for` makes the plan of one volume. None = options
            built by hand: :meth:`plan_for` keeps them.
    """

    window: Triplet
    stride: Triplet
    margin: Triplet
    offsets: tuple[Triplet, ...]
    delta_d: float
    norm: Literal["l1", "l2"] = "l2"
    blending: str = "gaussian"
    batch_size: int = 4
    device: str = "cpu"
    amp: bool = False
    num_threads: int = 0
    tta: str = "none"
    backend: str = "auto"
    request: WindowRequest | None = None

    def plan_for(self, shape: Sequence[int]) -> PredictOptions:
        """These options with the window, stride and batch size planned for a raw of ``shape``
        (z, y, x) (:func:`melecole.inference.planner.plan_windows`); the fingerprint records them.

        Raises:
            ConfigError: no window the model accepts fits INFERENCE.MEMORY_BUDGET_GB.
        """
        if self.request is None:
            return self
        plan = plan_windows(self.request, [int(size) for size in shape])
        return dataclasses.replace(self, window=plan.window, stride=plan.stride, batch_size=plan.batch_size)

    @property
    def tta_variants(self) -> list[TTAVariant]:
        """The test-time augmentation variants (identity first)."""
        return parse_tta(self.tta, self.window)

    @property
    def reach(self) -> Triplet:
        """Largest |offset| per axis."""
        return offset_reach(self.offsets)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def predict_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`melecole.inference.sliding_window.predict_volume`."""
        return dict(
            window=list(self.window),
            stride=list(self.stride),
            margin=list(self.margin),
            offsets=[list(o) for o in self.offsets],
            delta_d=self.delta_d,
            norm=self.norm,
            blending=self.blending,
            batch_size=self.batch_size,
            device=self.torch_device,
            amp=self.amp,
            tta=self.tta_variants,
            **({"backend": self.backend} if _predictor_takes("backend") else {}),
        )

    def fingerprint(self) -> dict[str, Any]:
        """What stored affinities depend on (JSON-able); batch size, device and threads do not change
        the values beyond float rounding and are left out."""
        return {
            "offsets": [list(o) for o in self.offsets],
            "window": list(self.window),
            "stride": list(self.stride),
            "margin": list(self.margin),
            "blending": self.blending,
            "norm": self.norm,
            "delta_d": self.delta_d,
            "amp": self.amp,
            "tta": [variant.name for variant in self.tta_variants],
        }

    def configure_threads(self) -> None:
        """Sets torch's CPU threads for this prediction (HARDWARE.NUM_THREADS semantics)."""
        from melecole.utils.device import configure_threads

        configure_threads(self.torch_device, self.num_threads)


def build_predict_options(cfg: Any) -> PredictOptions:
    """The prediction options of a merged config (resolves the device: CUDA when available).

    The window / stride / batch size are the block plan (no volume known yet); call
    :meth:`PredictOptions.plan_for` with a volume's shape for that volume's plan.
    """
    from melecole.utils.device import resolve_device

    request = window_request(cfg)  # a bad TTA spec fails here, before any model is loaded
    plan = plan_block_windows(request)
    device = resolve_device(cfg.HARDWARE.DEVICE)
    return PredictOptions(
        window=plan.window,
        stride=plan.stride,
        margin=request.margin,
        offsets=tuple(tuple(int(v) for v in o) for o in cfg.INFERENCE.OFFSETS),
        delta_d=float(cfg.LOSS.DELTA_D),
        norm=cfg.LOSS.NORM,
        blending=cfg.INFERENCE.BLENDING,
        batch_size=plan.batch_size,
        device=str(device),
        amp=bool(cfg.HARDWARE.AMP and device.type == "cuda"),
        num_threads=int(cfg.HARDWARE.NUM_THREADS),
        tta=str(cfg.INFERENCE.TTA),
        backend=str(cfg.INFERENCE.BACKEND),
        request=request,
    )
