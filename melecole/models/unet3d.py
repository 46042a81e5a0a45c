"""Residual symmetric 3D UNet (RSUNet-style) with an embedding head and a foreground head.

Layout for ``filters = (f0, f1, ..., fL)``::

    stem   conv STEM_KERNEL (e.g. 1x5x5): in_channels -> f0
    enc 0  LevelBlock(f0 -> f0)                               skip 0
    down   max-pool (1,2,2) or (2,2,2) per pool_z[0]
    enc 1  LevelBlock(f0 -> f1)                               skip 1
    ...
    enc L  LevelBlock(f(L-1) -> fL)                           (bottom, no skip)
    up     trilinear upsample + 1x1x1 conv fL -> f(L-1)       (or transposed conv, kernel = stride)
    merge  add skip L-1 (or concat)
    dec    LevelBlock(f(L-1) or 2 f(L-1) -> f(L-1))
    ...    back to f0 at full resolution = forward_features
    heads  1x1x1 conv f0 -> E (embedding), 1x1x1 conv f0 -> 1 (foreground logits)

Every LevelBlock is a 1x3x3 conv (changes channels, in-plane only) + a residual block of two 3x3x3
convs (see :class:`melecole.models.blocks.LevelBlock`); the z context comes from the 3x3x3 convs.
"""

from __future__ import annotations

from typing import Dict, Literal, Sequence

import torch
from torch import nn

from melecole.models.blocks import ConvNormAct, LevelBlock

UpsampleMode = Literal["trilinear", "transpose"]

# Channels of the local-shape-descriptor head (melecole.data.lsd computes its targets): size, mean
# offset z / y / x, variance zz / yy / xx, covariance zy / zx / yx.
LSD_CHANNELS = 10
SkipMode = Literal["add", "concat"]


class Upsample(nn.Module):
    """Doubles the resolution by ``scale`` and maps ``in_channels -> out_channels``.

    ``trilinear``: trilinear interpolation then a 1x1x1 conv (no checkerboard artefacts).
    ``transpose``: a transposed conv with kernel = stride = ``scale`` (learned, RSUNet's choice).
    Shapes ``(B, in_channels, Z, Y, X) -> (B, out_channels, Z*sz, Y*sy, X*sx)``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int], mode: str = "trilinear"):
        super().__init__()
        self.scale = tuple(int(s) for s in scale)
        self.mode = mode
        if mode == "trilinear":
            self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        elif mode == "transpose":
            self.conv = nn.ConvTranspose3d(
                in_channels, out_channels, kernel_size=self.scale, stride=self.scale
            )
        else:
            raise ValueError(f"unknown upsample mode {mode!r}; valid: trilinear, transpose")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "trilinear":
            # Upsample after the 1x1x1 conv: the same result (both are linear) on fewer channels.
            x = self.conv(x)
            return nn.functional.interpolate(
                x, scale_factor=self.scale, mode="trilinear", align_corners=False
            )
        return self.conv(x)


class UNet3D(nn.Module):
    """Residual symmetric 3D UNet producing voxel embeddings and foreground logits.

    Args:
        in_channels: raw channels C (1 for EM).
        filters: channels per level, ``len(filters) - 1`` downsamplings.
        pool_z: per downsampling, pool z too (2,2,2) or in-plane only (1,2,2).
        embedding_dim: E, channels of the embedding head.
        norm: batch | instance | group | none.
        norm_groups: groups of group norm (must divide every ``filters`` entry).
        activation: relu | elu | leaky_relu | gelu.
        stem_kernel: (z, y, x) kernel of the first conv, anisotropic for anisotropic EM.
        upsample: trilinear (+1x1x1 conv) or transpose (transposed conv).
        skip: add (skip + upsampled) or concat (channel concatenation).
        lsd_channels: > 0 adds a 1x1x1 head ``"lsd"`` (logits of local shape descriptors, an
            auxiliary training target) that only a network in training mode computes.

    Input ``(B, C, Z, Y, X)`` with Z divisible by 2**sum(pool_z) and Y, X by 2**(len(filters)-1);
    outputs have the same Z, Y, X.
    """

    def __init__(
        self,
        in_channels: int = 1,
        filters: Sequence[int] = (32, 64, 128, 256),
        pool_z: Sequence[bool] = (False, False, True),
        embedding_dim: int = 16,
        norm: str = "group",
        norm_groups: int = 8,
        activation: str = "elu",
        stem_kernel: Sequence[int] = (1, 5, 5),
        upsample: UpsampleMode = "trilinear",
        skip: SkipMode = "add",
        lsd_channels: int = 0,
    ) -> None:
        super().__init__()
        filters = [int(f) for f in filters]
        pool_z = [bool(p) for p in pool_z]
        if not filters:
            raise ValueError("filters must name at least one level")
        if len(pool_z) != len(filters) - 1:
            raise ValueError(f"pool_z needs len(filters) - 1 = {len(filters) - 1} entries, got {len(pool_z)}")
        if skip not in ("add", "concat"):
            raise ValueError(f"unknown skip mode {skip!r}; valid: add, concat")
        self.filters = tuple(filters)
        self.pool_z = tuple(pool_z)
        self.embedding_dim = int(embedding_dim)
        self.skip = skip
        # Channels of forward_features(): what a projection head (MoCo) attaches to.
        self.feature_channels = filters[0]
        block = dict(norm=norm, norm_groups=norm_groups, activation=activation)

        self.stem = ConvNormAct(in_channels, filters[0], stem_kernel, **block)
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        for level, channels in enumerate(filters):
            previous = filters[max(level - 1, 0)]
            self.encoders.append(LevelBlock(previous, channels, **block))
            if level < len(filters) - 1:
                scale = (2 if pool_z[level] else 1, 2, 2)
                self.pools.append(nn.MaxPool3d(kernel_size=scale, stride=scale))

        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        # Decoder levels run from the second deepest back to level 0.
        for level in reversed(range(len(filters) - 1)):
            scale = (2 if pool_z[level] else 1, 2, 2)
            self.upsamples.append(Upsample(filters[level + 1], filters[level], scale, upsample))
            merged = filters[level] * (2 if skip == "concat" else 1)
            self.decoders.append(LevelBlock(merged, filters[level], **block))

        self.embedding_head = nn.Conv3d(filters[0], self.embedding_dim, kernel_size=1)
        self.foreground_head = nn.Conv3d(filters[0], 1, kernel_size=1)
        self.lsd_head = nn.Conv3d(filters[0], int(lsd_channels), kernel_size=1) if lsd_channels > 0 else None
        self._init_weights(activation)

    def _init_weights(self, activation: str) -> None:
        # He init matched to the activation; the heads get a plain Xavier init because they are linear.
        nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity=nonlinearity)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        for head in (self.embedding_head, self.foreground_head, self.lsd_head):
            if head is None:
                continue
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features before the heads: ``(B, C, Z, Y, X) -> (B, filters[0], Z, Y, X)``."""
        if x.dim() != 5:
            raise ValueError(f"UNet3D expects (B, C, Z, Y, X) input, got shape {tuple(x.shape)}")
        x = self.stem(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < len(self.pools):
                skips.append(x)
                x = self.pools[level](x)
        for upsample, decoder in zip(self.upsamples, self.decoders):
            skip = skips.pop()
            x = upsample(x)
            x = x + skip if self.skip == "add" else torch.cat([x, skip], dim=1)
            x = decoder(x)
        return x

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Dict[str, torch.Tensor]:
        """``(B, C, Z, Y, X) -> {"embedding": (B, E, Z, Y, X), "foreground": (B, 1, Z, Y, X) logits}``.

        ``return_features``: also ``"features"``, the decoder features ``(B, filters[0], Z, Y, X)``
        that the heads read (what a MoCo projection head attaches to), from the same single pass,
        so a DDP-wrapped network is still called once per step. In training mode a network with an
        LSD head also returns ``"lsd"``, ``(B, LSD_CHANNELS, Z, Y, X)`` logits.
        """
        features = self.forward_features(x)
        outputs = {"embedding": self.embedding_head(features), "foreground": self.foreground_head(features)}
        if self.lsd_head is not None and self.training:
            outputs["lsd"] = self.lsd_head(features)
        if return_features:
            outputs["features"] = features
        return outputs
