"""Building blocks of the residual symmetric 3D UNet: normalisation, activation, conv + residual blocks.

All blocks keep the spatial size (``padding="same"``, stride 1); resolution changes happen only in
the pooling / upsampling layers of :mod:`melecole.models.unet3d`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

NormName = Literal["batch", "instance", "group", "none"]
ActivationName = Literal["relu", "elu", "leaky_relu", "gelu"]

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = ("relu", "elu", "leaky_relu", "gelu")


def make_norm(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps.

    ``instance`` and ``group`` normalise each sample on its own, so they work with batch 1.
    ``batch`` pools statistics over batch and voxels: batch 1 works in training mode as long as the
    feature map has more than one voxel (always true for inputs divisible by the downsampling).
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        # affine=True so that instance norm has the same learnable scale/shift as the others.
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        if channels % groups:
            raise ValueError(f"group norm: {groups} groups must divide {channels} channels")
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def make_activation(activation: str) -> nn.Module:
    """A fresh activation module (not in place: the residual sum reuses its inputs)."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "elu":
        return nn.ELU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if activation == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


class ConvNormAct(nn.Sequential):
    """Conv3d (same padding, no bias when normalised) -> norm -> activation.

    Shapes: ``(B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        norm: str = "group",
        norm_groups: int = 8,
        activation: str = "elu",
    ) -> None:
        # A bias right before a normalisation layer is redundant (the norm removes the mean).
        conv = nn.Conv3d(
            in_channels, out_channels, tuple(kernel_size), padding="same", bias=norm == "none"
        )
        super().__init__(conv, make_norm(norm, out_channels, norm_groups), make_activation(activation))


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with an identity shortcut (pre-sum norm, post-sum activation).

    ``x -> act(x + norm(conv(act(norm(conv(x))))))``; shapes ``(B, C, Z, Y, X) -> (B, C, Z, Y, X)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Sequence[int] = (3, 3, 3),
        norm: str = "group",
        norm_groups: int = 8,
        activation: str = "elu",
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, kernel_size, norm, norm_groups, activation)
        self.conv2 = nn.Conv3d(channels, channels, tuple(kernel_size), padding="same", bias=norm == "none")
        self.norm2 = make_norm(norm, channels, norm_groups)
        self.activation = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.norm2(self.conv2(self.conv1(x))))


class LevelBlock(nn.Sequential):
    """One UNet level (encoder or decoder), in the spirit of the DeepEM RSUNet:

    an in-plane 1x3x3 conv that changes the channel count (cheap, and it mixes only within a
    section, where EM resolution is highest) followed by a residual block of two 3x3x3 convs.
    Shapes ``(B, in_channels, Z, Y, X) -> (B, out_channels, Z, Y, X)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "group",
        norm_groups: int = 8,
        activation: str = "elu",
        residual_kernel: Sequence[int] = (3, 3, 3),
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, (1, 3, 3), norm, norm_groups, activation),
            ResidualBlock(out_channels, residual_kernel, norm, norm_groups, activation),
        )
