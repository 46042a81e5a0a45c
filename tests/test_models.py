"""UNet3D: shapes for many configurations, gradients, registry errors, batch 1, parameter count."""

from __future__ import annotations

import pytest
import torch

from melecole.config import load_cfg
from melecole.errors import ConfigError
from melecole.models import MODEL_REGISTRY, UNet3D, build_model


def tiny_unet(**overrides) -> UNet3D:
    arguments = dict(
        in_channels=1, filters=(4, 8), pool_z=(False,), embedding_dim=3, norm="group", norm_groups=2
    )
    arguments.update(overrides)
    return UNet3D(**arguments)


@pytest.mark.parametrize(
    "filters, pool_z, size",
    [
        ((4,), (), (3, 5, 7)),  # no downsampling: any size
        ((4, 8), (False,), (3, 8, 8)),
        ((4, 8), (True,), (4, 8, 8)),
        ((4, 8, 8), (False, True), (2, 8, 12)),
        ((4, 4, 8, 8), (True, False, True), (4, 16, 8)),
    ],
)
@pytest.mark.parametrize("upsample, skip", [("trilinear", "add"), ("transpose", "concat")])
def test_output_shapes(filters, pool_z, size, upsample, skip) -> None:
    model = tiny_unet(filters=filters, pool_z=pool_z, upsample=upsample, skip=skip)
    x = torch.randn(2, 1, *size)
    outputs = model(x)
    assert set(outputs) == {"embedding", "foreground"}
    assert outputs["embedding"].shape == (2, 3, *size)
    assert outputs["foreground"].shape == (2, 1, *size)
    assert model.forward_features(x).shape == (2, filters[0], *size)
    assert model.feature_channels == filters[0]


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("activation", ["relu", "elu", "leaky_relu", "gelu"])
def test_norms_and_activations(norm, activation) -> None:
    model = tiny_unet(norm=norm, activation=activation, in_channels=2, stem_kernel=(1, 3, 3))
    outputs = model(torch.randn(2, 2, 2, 8, 8))
    assert outputs["embedding"].shape == (2, 3, 2, 8, 8)
    assert torch.isfinite(outputs["embedding"]).all()


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_batch_one_trains(norm) -> None:
    # Batch norm pools statistics over the batch *and* voxels, so batch 1 works in train mode as
    # long as a feature map has more than one voxel (true whenever the input has > 1 voxel at the
    # deepest level); instance and group norm are per sample anyway.
    model = tiny_unet(norm=norm).train()
    outputs = model(torch.randn(1, 1, 2, 8, 8))
    (outputs["embedding"].sum() + outputs["foreground"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradients_reach_every_parameter() -> None:
    model = tiny_unet(filters=(4, 8, 8), pool_z=(False, True))
    outputs = model(torch.randn(2, 1, 2, 8, 8))
    (outputs["embedding"].pow(2).mean() + outputs["foreground"].mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_stem_kernel_keeps_size() -> None:
    model = tiny_unet(stem_kernel=(1, 4, 4))
    assert model(torch.randn(1, 1, 2, 8, 8))["embedding"].shape == (1, 3, 2, 8, 8)


def test_wrong_input_rank_is_clear() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        tiny_unet()(torch.randn(1, 8, 8))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pool_z"):
        tiny_unet(pool_z=(False, True))
    with pytest.raises(ValueError, match="group"):
        tiny_unet(filters=(3, 6), norm_groups=2)
    with pytest.raises(ValueError, match="valid"):
        tiny_unet(norm="layer")
    with pytest.raises(ValueError, match="valid"):
        tiny_unet(activation="tanh")


def test_registry_and_unknown_architecture() -> None:
    assert "unet3d" in MODEL_REGISTRY
    cfg = load_cfg(freeze=False)
    cfg.MODEL.ARCHITECTURE = "resnet"
    with pytest.raises(ConfigError, match="unet3d"):
        build_model(cfg)


def test_build_model_from_default_config() -> None:
    cfg = load_cfg()
    model = build_model(cfg)
    assert isinstance(model, UNet3D)
    assert model.filters == (32, 64, 128, 256)
    assert model.embedding_dim == cfg.MODEL.EMBEDDING_DIMENSION
    # Hand count of the RSUNet layout for [32, 64, 128, 256]: ~6.5 M parameters, dominated by the
    # two 3x3x3 convs at the deepest level (2 * 27 * 256**2 ~ 3.5 M).
    parameters = sum(p.numel() for p in model.parameters())
    assert 6.0e6 < parameters < 7.0e6
    deepest = 2 * 27 * 256 * 256
    assert parameters > deepest


def test_parameter_count_scales_with_width() -> None:
    narrow = sum(p.numel() for p in tiny_unet(filters=(4, 8)).parameters())
    wide = sum(p.numel() for p in tiny_unet(filters=(8, 16)).parameters())
    # Conv weights dominate and grow with channels squared.
    assert 3.0 < wide / narrow < 4.5


def test_default_snemi_model_forward() -> None:
    # The full 20x128x128 patch takes ~4 s on one CPU thread; a 20x64x64 patch exercises the same
    # layers and pooling pattern ([False, False, True] needs z % 2 == 0, y, x % 8 == 0).
    cfg = load_cfg()
    model = build_model(cfg).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, 20, 64, 64))
    assert outputs["embedding"].shape == (1, 16, 20, 64, 64)
    assert outputs["foreground"].shape == (1, 1, 20, 64, 64)
    assert torch.isfinite(outputs["embedding"]).all()


def test_return_features_gives_the_decoder_features_of_the_same_pass() -> None:
    torch.manual_seed(0)
    model = UNet3D(filters=(4, 8), pool_z=(False,), embedding_dim=3, norm="group", norm_groups=2).eval()
    x = torch.rand(2, 1, 4, 16, 16)
    outputs = model(x, return_features=True)
    assert set(outputs) == {"embedding", "foreground", "features"} and set(model(x)) == {"embedding", "foreground"}
    assert outputs["features"].shape == (2, model.feature_channels, 4, 16, 16)
    torch.testing.assert_close(outputs["features"], model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(outputs["embedding"], model.embedding_head(outputs["features"]), rtol=0, atol=0)
