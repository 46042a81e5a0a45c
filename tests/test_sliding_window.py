"""Sliding-window blending equals whole-volume prediction for a translation-equivariant model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from melecole.config import get_default_cfg
from melecole.inference.affinities import INVALID_AFFINITY, embeddings_to_affinities, offset_valid_mask
from melecole.inference.sliding_window import blending_profile, predict_volume, window_starts

OFFSETS = [list(offset) for offset in get_default_cfg().INFERENCE.OFFSETS]  # the 12 default offsets


class PointwiseModel(nn.Module):
    """Embedding and foreground are functions of the voxel itself (1x1x1 convolutions)."""

    def __init__(self, embedding_dim: int = 4, random_frame: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Conv3d(1, embedding_dim, 1)
        self.foreground = nn.Conv3d(1, 1, 1)
        self.random_frame = random_frame
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        embedding = torch.sin(3 * self.embedding(x))
        if self.random_frame:  # every window gets its own frame: only differences are meaningful
            embedding = embedding + 10 * torch.randn(x.shape[0], embedding.shape[1], 1, 1, 1)
        return {"embedding": embedding, "foreground": 4 * self.foreground(x)}


def _reference(model: PointwiseModel, raw: np.ndarray, delta_d: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        output = model(torch.from_numpy(raw).float()[None, None] / 255)
    affinities = embeddings_to_affinities(output["embedding"][0].numpy(), OFFSETS, delta_d)
    return affinities, torch.sigmoid(output["foreground"][0, 0]).numpy()


def _raw(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


@pytest.mark.parametrize(
    "shape, window, stride, margin, blending",
    [
        ((12, 40, 40), (8, 16, 16), None, (1, 2, 2), "gaussian"),  # half-window stride, ragged end
        ((13, 37, 29), (8, 16, 16), (4, 6, 6), (1, 2, 2), "bump"),  # non-multiple sizes
        ((13, 37, 29), (8, 16, 16), (2, 3, 5), (0, 0, 0), "constant"),
        ((5, 11, 40), (8, 16, 16), (4, 8, 8), (1, 1, 1), "gaussian"),  # smaller than the window in z, y
        ((8, 16, 16), (8, 16, 16), None, (2, 4, 4), "gaussian"),  # exactly one window
        ((3, 2, 1), (4, 8, 8), None, (1, 1, 1), "constant"),  # tiny volume, every axis padded
    ],
)
def test_blended_equals_whole_volume(shape, window, stride, margin, blending) -> None:
    model = PointwiseModel()
    raw = _raw(shape)
    expected_affinities, expected_foreground = _reference(model, raw)
    affinities, foreground = predict_volume(
        model,
        raw,
        window=window,
        stride=stride,
        margin=margin,
        offsets=OFFSETS,
        delta_d=1.0,
        blending=blending,
        batch_size=3,
        progress=False,
    )
    assert affinities.shape == (len(OFFSETS),) + shape and affinities.dtype == np.float32
    assert foreground.shape == shape and foreground.dtype == np.float32
    np.testing.assert_allclose(affinities, expected_affinities, atol=2e-6)
    np.testing.assert_allclose(foreground, expected_foreground, atol=2e-6)
    assert np.all(affinities[~offset_valid_mask(shape, OFFSETS)] == INVALID_AFFINITY)


def test_embedding_frames_may_differ_between_windows() -> None:
    """Only affinities are blended, so a per-window shift of every embedding changes nothing."""
    model = PointwiseModel(random_frame=False)
    raw = _raw((12, 30, 30), seed=1)
    expected, _ = _reference(model, raw)
    model.random_frame = True
    affinities, _ = predict_volume(
        model, raw, window=(8, 16, 16), margin=(1, 2, 2), offsets=OFFSETS, delta_d=1.0, progress=False
    )
    np.testing.assert_allclose(affinities, expected, atol=1e-5)


def test_batch_size_does_not_change_results() -> None:
    model = PointwiseModel()
    raw = _raw((10, 33, 35), seed=2)
    kwargs = dict(window=(8, 16, 16), margin=(1, 2, 2), offsets=OFFSETS, delta_d=1.0, progress=False)
    one = predict_volume(model, raw, batch_size=1, **kwargs)
    model.calls = 0
    many = predict_volume(model, raw, batch_size=5, **kwargs)
    windows = len(window_starts(10, 8, 4)) * len(window_starts(33, 16, 8)) * len(window_starts(35, 16, 8))
    assert model.calls == -(-windows // 5)
    for first, second in zip(one, many):
        np.testing.assert_allclose(first, second, atol=1e-6)


def test_region_output_matches_cropped_reference() -> None:
    """A padded raw: predict with the whole raw as context, output only the labelled region."""
    model = PointwiseModel()
    raw = _raw((14, 40, 44), seed=3)
    region = (slice(2, 12), slice(4, 36), slice(4, 40))
    affinities, foreground = predict_volume(
        model,
        raw,
        window=(8, 16, 16),
        margin=(1, 2, 2),
        offsets=OFFSETS,
        delta_d=1.0,
        progress=False,
        region=region,
    )
    expected_affinities, expected_foreground = _reference(model, raw[region])
    np.testing.assert_allclose(affinities, expected_affinities, atol=2e-6)
    np.testing.assert_allclose(foreground, expected_foreground, atol=2e-6)


def test_float_input_and_real_unet() -> None:
    from melecole.config import load_cfg
    from melecole.models import build_model

    cfg = load_cfg(None, ["MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]", "MODEL.EMBEDDING_DIMENSION", "4"])
    model = build_model(cfg)
    raw = np.random.default_rng(4).random((6, 20, 24)).astype(np.float32)
    affinities, foreground = predict_volume(
        model, raw, window=(4, 16, 16), margin=(0, 2, 2), offsets=OFFSETS, delta_d=1.5, progress=False
    )
    assert affinities.shape == (12, 6, 20, 24) and foreground.shape == (6, 20, 24)
    assert np.isfinite(affinities).all() and affinities.min() >= 0 and affinities.max() <= 1
    assert foreground.min() >= 0 and foreground.max() <= 1
    assert not model.training


def test_window_starts_and_profiles() -> None:
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # last window aligned to the end
    assert window_starts(4, 4, 2) == [0]
    for blending in ("gaussian", "bump", "constant"):
        profile = blending_profile(9, blending)
        assert profile.min() > 0 and profile.max() == pytest.approx(1.0)
        assert np.allclose(profile, profile[::-1])
    with pytest.raises(ValueError, match="blending"):
        blending_profile(4, "cosine")  # type: ignore[arg-type]


def test_uncovered_pairs_and_bad_geometry_raise() -> None:
    model = PointwiseModel()
    raw = _raw((12, 20, 20))
    with pytest.raises(ValueError, match="covered by no window"):
        predict_volume(
            model,
            raw,
            window=(4, 16, 16),
            stride=(2, 8, 8),
            margin=(1, 2, 2),
            offsets=OFFSETS,
            delta_d=1.0,
            progress=False,
        )
    with pytest.raises(ValueError, match="stride"):
        predict_volume(
            model,
            raw,
            window=(4, 16, 16),
            stride=(5, 8, 8),
            margin=(0, 0, 0),
            offsets=OFFSETS,
            delta_d=1.0,
            progress=False,
        )
    with pytest.raises(ValueError, match="uint8 or float"):
        predict_volume(model, raw.astype(np.int32), window=(4, 16, 16), offsets=OFFSETS, delta_d=1.0, progress=False)
