"""MeLeCoLe: metric learning and contrastive learning for neuron segmentation in 3D EM."""

__version__ = "0.1.0"
