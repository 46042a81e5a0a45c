"""Test-time augmentation: variants, exact mapping of affinity channels, equivariant model = no TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from melecole.config import get_default_cfg, load_cfg
from melecole.errors import ConfigError
from melecole.inference.affinities import (
    INVALID_AFFINITY,
    affinities_from_labels,
    embeddings_to_affinities,
    offset_valid_mask,
)
from melecole.inference.options import build_predict_options
from melecole.inference.sliding_window import predict_volume
from melecole.inference.tta import IDENTITY, TTAVariant, parse_tta, window_affinities

OFFSETS = [list(offset) for offset in get_default_cfg().INFERENCE.OFFSETS]  # the 12 default offsets
ALL_VARIANTS = parse_tta("zyxt")


def test_parse_tta_variants() -> None:
    assert parse_tta("none") == [IDENTITY]
    assert parse_tta("") == [IDENTITY]
    assert len(ALL_VARIANTS) == 16 and len(set(ALL_VARIANTS)) == 16 and ALL_VARIANTS[0] == IDENTITY
    assert {variant.name for variant in parse_tta("yx")} == {"identity", "y", "x", "yx"}
    assert {variant.name for variant in parse_tta("zt")} == {"identity", "z", "t", "zt"}


@pytest.mark.parametrize("spec", ["zq", "zz", "flip"])
def test_parse_tta_rejects_bad_letters(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"INFERENCE.TTA: .*expected none or distinct letters"):
        parse_tta(spec)


def test_parse_tta_rejects_transpose_of_non_square_window() -> None:
    with pytest.raises(ConfigError, match=r"window \[8, 16, 32\] has y != x"):
        parse_tta("yxt", window=(8, 16, 32))
    assert len(parse_tta("yx", window=(8, 16, 32))) == 4


def test_variant_apply_invert_and_offsets() -> None:
    volume = torch.arange(2 * 3 * 4 * 4).reshape(1, 2, 3, 4, 4)
    for variant in ALL_VARIANTS:
        assert torch.equal(variant.invert(variant.apply(volume)), volume)
    variant = TTAVariant(flips=(0, 2), transpose=True)
    assert variant.map_offset((-1, -5, 3)) == (1, -3, -5)  # negate z and x, then swap y and x
    # The voxel mapping and the offset mapping agree: value at p + o lands at M(p) + L o.
    transformed = variant.apply(volume)[0, 0]
    p, o = np.array([1, 2, 1]), np.array([-1, 1, 2])
    mapped = lambda q: (2 - q[0], 3 - q[2], q[1])  # noqa: E731  flip z (size 3) and x (size 4), swap y/x
    assert transformed[mapped(p)] == volume[0, 0][tuple(p)]
    partner = np.array(mapped(p)) + np.array(variant.map_offset(o))
    assert transformed[tuple(partner)] == volume[0, 0][tuple(p + o)]


def _blocky_labels(shape, seed: int = 0) -> np.ndarray:
    """Random boxes of ids 1..: many object borders along every axis and offset."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 30, (shape[0] // 2 + 1, shape[1] // 3 + 1, shape[2] // 3 + 1))
    labels = coarse.repeat(2, 0).repeat(3, 1).repeat(3, 2)[: shape[0], : shape[1], : shape[2]]
    return labels.astype(np.int64)


def _label_model(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embedding = 10 x label: one object -> distance 0 (affinity 1), two -> >= 10 (affinity 0)."""
    return {"embedding": 10.0 * x, "foreground": torch.zeros_like(x)}


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=lambda v: v.name)
def test_remapping_is_exact_for_every_default_offset(variant: TTAVariant) -> None:
    labels = _blocky_labels((8, 12, 12))
    batch = torch.from_numpy(labels).float()[None, None]
    affinities, foreground = window_affinities(_label_model, batch, [variant], OFFSETS, 1.5, "l2")
    expected = affinities_from_labels(labels, OFFSETS)
    np.testing.assert_array_equal(affinities[0].numpy(), expected)
    # Pairs leaving the window are invalid in every variant (L maps the window onto itself).
    invalid = ~offset_valid_mask(labels.shape, OFFSETS)
    assert np.all(affinities[0].numpy()[invalid] == INVALID_AFFINITY)
    assert 0.2 < expected[offset_valid_mask(labels.shape, OFFSETS)].mean() < 0.95  # both kinds of pairs
    np.testing.assert_array_equal(foreground[0].numpy(), np.full(labels.shape, 0.5, np.float32))


def test_all_variants_averaged_equal_the_label_affinities() -> None:
    labels = _blocky_labels((6, 9, 9), seed=1)
    batch = torch.from_numpy(np.stack([labels, labels[::-1].copy()])).float()[:, None]
    affinities, _ = window_affinities(_label_model, batch, ALL_VARIANTS, OFFSETS, 1.5, "l2")
    np.testing.assert_array_equal(affinities[0].numpy(), affinities_from_labels(labels, OFFSETS))
    np.testing.assert_array_equal(affinities[1].numpy(), affinities_from_labels(labels[::-1], OFFSETS))


def test_flipped_offset_value_sits_at_the_partner_voxel() -> None:
    """The remapping view: after a z flip, offset (-1, 0, 0) is (+1, 0, 0) = channel (-1, 0, 0) at p + o'."""
    embedding = torch.randn(3, 5, 6, 7)
    plus = embeddings_to_affinities(embedding, [(1, 0, 0)], 1.5)[0]
    minus = embeddings_to_affinities(embedding, [(-1, 0, 0)], 1.5)[0]
    torch.testing.assert_close(plus[:-1], minus[1:], rtol=0, atol=0)


class SymmetricConvModel(nn.Module):
    """3x3x3 convolutions whose kernels are averaged over the 16 variants (so the model is
    equivariant to flips and the y<->x transpose), or left random (``symmetric=False``)."""

    def __init__(self, symmetric: bool = True, embedding_dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Conv3d(1, embedding_dim, 3, padding=1)
        self.foreground = nn.Conv3d(1, 1, 3, padding=1)
        if symmetric:
            with torch.no_grad():
                for conv in (self.embedding, self.foreground):
                    conv.weight.copy_(torch.stack([v.apply(conv.weight) for v in ALL_VARIANTS]).mean(0))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": torch.sin(3 * self.embedding(x)), "foreground": 4 * self.foreground(x)}


def _predict(model: nn.Module, raw: np.ndarray, tta) -> tuple[np.ndarray, np.ndarray]:
    return predict_volume(
        model, raw, window=(8, 16, 16), margin=(1, 2, 2), offsets=OFFSETS, delta_d=1.0, progress=False, tta=tta
    )


def test_equivariant_model_tta_equals_no_tta_through_predict_volume() -> None:
    raw = np.random.default_rng(0).integers(0, 256, (12, 30, 27)).astype(np.uint8)
    model = SymmetricConvModel()
    plain_affinities, plain_foreground = _predict(model, raw, None)
    tta_affinities, tta_foreground = _predict(model, raw, ALL_VARIANTS)
    np.testing.assert_allclose(tta_affinities, plain_affinities, atol=2e-6)
    np.testing.assert_allclose(tta_foreground, plain_foreground, atol=2e-6)
    assert plain_affinities.std() > 0.05  # not a constant output


def test_non_equivariant_model_tta_differs() -> None:
    raw = np.random.default_rng(0).integers(0, 256, (12, 30, 27)).astype(np.uint8)
    model = SymmetricConvModel(symmetric=False)
    plain_affinities, _ = _predict(model, raw, None)
    tta_affinities, _ = _predict(model, raw, ALL_VARIANTS)
    assert np.abs(tta_affinities - plain_affinities).max() > 0.05


def test_config_reaches_predict_options() -> None:
    cfg = load_cfg(None, ["INFERENCE.TTA", "yx", "INFERENCE.WINDOW_SIZE", "[8, 16, 32]"])
    options = build_predict_options(cfg)
    assert len(options.predict_kwargs()["tta"]) == 4 and options.fingerprint()["tta"] == ["identity", "x", "y", "yx"]
    cfg = load_cfg(None, [])
    assert build_predict_options(cfg).predict_kwargs()["tta"] == [IDENTITY]
