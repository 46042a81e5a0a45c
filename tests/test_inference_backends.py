"""melecole.inference.backends: every forward backend gives torch's affinities through predict_volume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from melecole.errors import ConfigError
from melecole.inference import backends
from melecole.inference.backends import (
    BACKENDS,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchBackend,
    build_backend,
    check_backend,
)
from melecole.inference.sliding_window import predict_volume
from melecole.inference.tta import parse_tta
from melecole.models.unet3d import UNet3D

WINDOW = (8, 16, 16)
OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -3, 3)]
INSTALLED = [name for name in BACKENDS if backends._installed(name)]


@pytest.fixture(scope="module")
def model() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(filters=(4, 8, 8), pool_z=(False, True), embedding_dim=5, norm="group", norm_groups=2).eval()


def _predict(model: UNet3D, backend: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.random.default_rng(0).integers(0, 256, size=(12, 28, 24), dtype=np.uint8)
    # batch 3 over 8 windows: the last batch is smaller; TTA "yt" sends flipped and transposed views.
    return predict_volume(
        model, raw, window=WINDOW, stride=(4, 8, 8), margin=(1, 2, 2), offsets=OFFSETS, delta_d=1.5,
        batch_size=3, progress=False, tta=parse_tta("yt", WINDOW), backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])  # openvino: one request reused per variant / two streams
@pytest.mark.parametrize("name", [name for name in ("onnxruntime", "openvino") if name in INSTALLED])
def test_backend_affinities_match_torch(model: UNet3D, name: str, threads: int) -> None:
    expected_affinities, expected_foreground = _predict(model, "torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        affinities, foreground = _predict(model, name)
    finally:
        torch.set_num_threads(previous)
    assert affinities.shape == expected_affinities.shape == (4, 12, 28, 24)
    assert np.abs(expected_affinities).max() > 0.1  # a real, non-constant prediction
    np.testing.assert_allclose(affinities, expected_affinities, atol=1e-4, rtol=0)
    np.testing.assert_allclose(foreground, expected_foreground, atol=1e-4, rtol=0)
    assert not np.array_equal(affinities, np.zeros_like(affinities))


def test_torch_backend_is_the_model_bit_for_bit(model: UNet3D) -> None:
    batch = torch.rand((2, 1, *WINDOW), generator=torch.Generator().manual_seed(3))
    backend = build_backend("torch", model, WINDOW)
    assert isinstance(backend, TorchBackend)
    with torch.inference_mode():
        got, expected = backend(batch), model(batch)
    for key in ("embedding", "foreground"):
        assert torch.equal(got[key], expected[key])


def test_unknown_backend_names_the_choices(model: UNet3D) -> None:
    with pytest.raises(ConfigError, match="'tensorrt'.*expected one of auto, torch, onnxruntime, openvino"):
        check_backend("tensorrt")
    with pytest.raises(ConfigError, match="expected one of auto, torch, onnxruntime, openvino"):
        _predict(model, "tensorrt")
    assert check_backend(" OpenVINO ") == "openvino"


def test_missing_package_is_an_error_when_named_and_skipped_by_auto(model, monkeypatch, caplog) -> None:
    monkeypatch.setattr(backends, "_installed", lambda name: name == "torch")
    with pytest.raises(ConfigError, match="'openvino' needs the Python package 'openvino'.*pip install openvino"):
        build_backend("openvino", model, WINDOW)
    with caplog.at_level(logging.INFO, logger="melecole.inference.backends"):
        chosen = build_backend("auto", model, WINDOW)
    assert isinstance(chosen, TorchBackend)
    assert "openvino is not installed" in caplog.text and "onnxruntime is not installed" in caplog.text


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime is not installed")
def test_export_failure_falls_back_under_auto_and_raises_when_named(model, monkeypatch, caplog) -> None:
    monkeypatch.setattr(backends, "AUTO_ORDER", ("onnxruntime", "torch"))
    fresh = UNet3D(filters=(4,), pool_z=(), embedding_dim=3, norm_groups=2).eval()  # not in the cache

    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr("melecole.models.export.onnx_bytes", failing_export)
    with caplog.at_level(logging.WARNING, logger="melecole.inference.backends"):
        assert isinstance(build_backend("auto", fresh, WINDOW), TorchBackend)
    assert "onnxruntime unavailable" in caplog.text and "exporter broke" in caplog.text
    with pytest.raises(backends.BackendUnavailable, match="exporter broke"):
        build_backend("onnxruntime", fresh, WINDOW)


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime is not installed")
def test_export_is_cached_per_model_weights_and_window(model, monkeypatch) -> None:
    from melecole.models import export

    calls = []
    real = export.onnx_bytes
    monkeypatch.setattr(export, "onnx_bytes", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    fresh = UNet3D(filters=(4,), pool_z=(), embedding_dim=3, norm_groups=2).eval()
    first = build_backend("onnxruntime", fresh, WINDOW)
    assert isinstance(first, OnnxRuntimeBackend)
    assert build_backend("onnxruntime", fresh, WINDOW).session is first.session and len(calls) == 1
    with torch.no_grad():
        fresh.embedding_head.bias.add_(1.0)  # new weights: a new export, giving the new outputs
    changed = build_backend("onnxruntime", fresh, WINDOW)
    assert changed.session is not first.session and len(calls) == 2
    batch = torch.rand((1, 1, *WINDOW))
    with torch.inference_mode():
        torch.testing.assert_close(changed(batch)["embedding"], fresh(batch)["embedding"], atol=1e-4, rtol=0)


def test_non_cpu_device_and_auto_choice(model: UNet3D) -> None:
    # Any non-CPU device runs torch, whatever was asked for (the meta device needs no GPU).
    assert isinstance(build_backend("openvino", model, WINDOW, device="meta"), TorchBackend)
    expected = {"openvino": OpenVinoBackend, "onnxruntime": OnnxRuntimeBackend}.get(
        next(name for name in backends.AUTO_ORDER if name in INSTALLED), TorchBackend
    )
    assert isinstance(build_backend("auto", model, WINDOW), expected)


@pytest.mark.skipif("openvino" not in INSTALLED, reason="openvino not installed")
def test_openvino_runs_tta_variants_concurrently_with_the_same_outputs(model: UNet3D) -> None:
    batches = [torch.rand((1, 1, *WINDOW), generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    sequential = build_backend("openvino", model, WINDOW, threads=2)
    concurrent = build_backend("openvino", model, WINDOW, threads=2, parallel=4)
    assert (sequential.streams, concurrent.streams) == (1, 2)  # streams = min(parallel, threads)
    assert build_backend("openvino", model, WINDOW, threads=1, parallel=4).streams == 1
    outputs, kept = [], []
    for batch, output in zip(batches, concurrent.run_many(batches), strict=True):  # groups of 2 requests, then 1
        expected = sequential(batch)
        for key in ("embedding", "foreground"):
            torch.testing.assert_close(output[key], expected[key], atol=1e-5, rtol=0)
        outputs.append(output)
        kept.append(output["embedding"].clone())
    assert not torch.equal(kept[0], kept[1])  # each request of a group has its own output
    # The outputs are borrowed, not copied: the third batch ran on the first request and overwrote its buffers.
    assert torch.equal(outputs[0]["embedding"], kept[2]) and not torch.equal(kept[0], kept[2])


def test_window_affinities_hands_all_variants_to_run_many(model: UNet3D) -> None:
    from melecole.inference.tta import window_affinities

    class Concurrent:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
            raise AssertionError("a backend with run_many gets every variant through it")

        def run_many(self, batches):
            self.calls.append(len(batches))
            return [model(batch) for batch in batches]

    batch = torch.rand((2, 1, *WINDOW), generator=torch.Generator().manual_seed(5))
    variants = parse_tta("yx", WINDOW)
    backend = Concurrent()
    with torch.inference_mode():
        affinities, foreground = window_affinities(backend, batch, variants, OFFSETS, 1.5, "l2")
        expected = window_affinities(model, batch, variants, OFFSETS, 1.5, "l2")
    assert backend.calls == [4]
    torch.testing.assert_close(affinities, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(foreground, expected[1], atol=0, rtol=0)
