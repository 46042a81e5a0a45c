"""Viewing results: a neuroglancer viewer (interactive) and PNG montages (headless)."""

from melecole.visualization.report import render_report
from melecole.visualization.viewer import (
    ViewInputs,
    build_viewer_state,
    crop_to_labels,
    infer_padding,
    open_view_inputs,
    start_viewer,
)

__all__ = [
    "ViewInputs",
    "build_viewer_state",
    "crop_to_labels",
    "infer_padding",
    "open_view_inputs",
    "render_report",
    "start_viewer",
]
