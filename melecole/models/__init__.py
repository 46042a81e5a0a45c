"""Networks: a name registry, ``build_model(cfg)`` (the only place that reads MODEL.* keys) and
``build_dense_moco(cfg, encoder)`` (MOCO.*)."""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn
from yacs.config import CfgNode as CN

from melecole.errors import ConfigError
from melecole.models.moco import DenseMoCo, ProjectionHead
from melecole.models.unet3d import LSD_CHANNELS, UNet3D

__all__ = ["MODEL_REGISTRY", "DenseMoCo", "ProjectionHead", "UNet3D", "build_dense_moco", "build_model"]


def _build_unet3d(cfg: CN) -> UNet3D:
    return UNet3D(
        in_channels=cfg.MODEL.IN_CHANNELS,
        filters=tuple(cfg.MODEL.FILTERS),
        pool_z=tuple(cfg.MODEL.POOL_Z),
        embedding_dim=cfg.MODEL.EMBEDDING_DIMENSION,
        norm=cfg.MODEL.NORM,
        norm_groups=cfg.MODEL.NORM_GROUPS,
        activation=cfg.MODEL.ACTIVATION,
        stem_kernel=tuple(cfg.MODEL.STEM_KERNEL),
        lsd_channels=LSD_CHANNELS if cfg.MODEL.LSD_HEAD else 0,
    )


# MODEL.ARCHITECTURE -> builder taking the config.
MODEL_REGISTRY: Dict[str, Callable[[CN], nn.Module]] = {"unet3d": _build_unet3d}


def build_model(cfg: CN) -> nn.Module:
    """The network named by MODEL.ARCHITECTURE, on CPU (the caller moves it to its device)."""
    name = cfg.MODEL.ARCHITECTURE
    if name not in MODEL_REGISTRY:
        raise ConfigError(
            f"MODEL.ARCHITECTURE {name!r} is not a known model; valid: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[name](cfg)


def build_dense_moco(cfg: CN, encoder: nn.Module) -> DenseMoCo:
    """DenseMoCo from MOCO.* (validated by ``melecole.config``) for the unwrapped online ``encoder``."""
    moco = cfg.MOCO
    if moco.PROJECTION_INPUT == "features":
        channels = int(getattr(encoder, "feature_channels", cfg.MODEL.FILTERS[0]))
    else:
        channels = int(cfg.MODEL.EMBEDDING_DIMENSION)
    return DenseMoCo(
        encoder,
        feature_channels=channels,
        projection_dim=moco.PROJECTION_DIM,
        projection_hidden=moco.PROJECTION_HIDDEN,
        queue_size=moco.QUEUE_SIZE,
        momentum=moco.MOMENTUM,
        temperature=moco.TEMPERATURE,
        projection_input=moco.PROJECTION_INPUT,
        supervised=moco.SUPERVISED,
    )
