"""melecole.models.export: ONNX and TorchScript files give the eager model's outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from melecole.models.export import INPUT_NAME, OUTPUT_NAMES, export_onnx, export_torchscript, onnx_bytes
from melecole.models.unet3d import UNet3D

WINDOW = (8, 16, 16)


def _model() -> UNet3D:
    torch.manual_seed(0)
    # Left in train mode on purpose: the export must use eval mode without changing the caller's model.
    return UNet3D(filters=(4, 8, 8), pool_z=(False, True), embedding_dim=5, norm="group", norm_groups=2)


def _eager(model: UNet3D, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        outputs = model(raw)
    return outputs["embedding"].numpy(), outputs["foreground"].numpy()


def test_onnx_runtime_matches_eager_with_dynamic_batch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    path = export_onnx(model, WINDOW, tmp_path / "model.onnx")
    assert model.training, "export must not change the caller's model mode"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temporary left behind"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [item.name for item in session.get_inputs()] == [INPUT_NAME]
    assert [item.name for item in session.get_outputs()] == list(OUTPUT_NAMES)
    assert session.get_inputs()[0].shape[1:] == [1, *WINDOW]
    for batch in (1, 3):  # exported at batch 2: the batch axis is dynamic
        raw = torch.rand((batch, 1, *WINDOW), generator=torch.Generator().manual_seed(batch))
        embedding, foreground = session.run(None, {INPUT_NAME: raw.numpy()})
        expected_embedding, expected_foreground = _eager(model, raw)
        assert embedding.shape == (batch, 5, *WINDOW) and foreground.shape == (batch, 1, *WINDOW)
        np.testing.assert_allclose(embedding, expected_embedding, atol=1e-4, rtol=0)
        np.testing.assert_allclose(foreground, expected_foreground, atol=1e-4, rtol=0)


def test_torchscript_reload_equals_eager(tmp_path: Path) -> None:
    model = _model()
    path = export_torchscript(model, WINDOW, tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    raw = torch.rand((3, 1, *WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding, foreground = loaded(raw)
    expected_embedding, expected_foreground = _eager(model, raw)
    np.testing.assert_array_equal(embedding.numpy(), expected_embedding)
    np.testing.assert_array_equal(foreground.numpy(), expected_foreground)


def test_bad_arguments_and_failed_write_keep_old_file(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match="window_shape needs 3 positive sizes"):
        onnx_bytes(model, (16, 16))
    with pytest.raises(ValueError, match="exporter must be one of auto, torchscript, dynamo"):
        onnx_bytes(model, WINDOW, exporter="tflite")
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier file")
    # A window the UNet cannot take (y, x not divisible by 4): the trace fails, the earlier file stays.
    with pytest.raises(RuntimeError):
        export_torchscript(model, (8, 15, 15), target)
    assert target.read_bytes() == b"earlier file"
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
