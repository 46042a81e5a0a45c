"""Window planning (melecole/inference/planner.py) and its config keys: coverage, pairs, budget, explicit settings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from melecole.config import load_cfg
from melecole.errors import ConfigError
from melecole.inference.options import build_predict_options, resolve_windows
from melecole.inference.planner import (
    WindowRequest,
    plan_block_windows,
    plan_windows,
    required_overlap,
    spread_stride,
    window_count,
)
from melecole.inference.sliding_window import predict_volume, window_starts

MODEL = ["MODEL.INPUT_SIZE", "[8, 32, 32]", "MODEL.FILTERS", "[8, 16]", "MODEL.POOL_Z", "[False]",
         "MODEL.EMBEDDING_DIMENSION", "4", "HARDWARE.DEVICE", "cpu"]  # fmt: skip
AUTO = MODEL + ["INFERENCE.WINDOW_SIZE", "auto", "INFERENCE.BATCH_SIZE", "0"]


def request(**changes) -> WindowRequest:
    values = dict(window=None, stride=None, overlap=(2, 8, 8), margin=(1, 2, 2), reach=(2, 5, 5), factors=(1, 4, 4),
                  batch_size=0, memory_budget=1e9, bytes_per_voxel=400.0)  # fmt: skip
    values.update(changes)
    return WindowRequest(**values)


def cropped_cover(size: int, window: int, stride: int, margin: int) -> list[tuple[int, int]]:
    """[lo, hi) in volume coordinates of each window's cropped region along one axis (as sliding_window)."""
    spans = []
    for start in window_starts(size, window, stride):
        lo = start if start == 0 else start + margin
        hi = start + window if start + window == size else start + window - margin
        spans.append((lo, hi))
    return spans


SHAPES = [(25, 250, 250), (50, 100, 200), (64, 512, 512), (7, 30, 41), (1, 5, 300), (130, 333, 97)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [1e9, 5e7])
def test_plan_covers_every_voxel_and_puts_each_pair_in_one_cropped_window(shape, budget) -> None:
    req = request(memory_budget=budget)
    plan = plan_windows(req, shape)
    for axis, size in enumerate(shape):
        window, stride, margin, reach = plan.window[axis], plan.stride[axis], req.margin[axis], req.reach[axis]
        assert window % req.factors[axis] == 0 and 1 <= stride <= window
        padded = max(size, window)
        spans = cropped_cover(padded, window, stride, margin)
        assert len(spans) == plan.counts[axis] == window_count(padded, window, stride)
        covered = np.zeros(padded, dtype=bool)
        for lo, hi in spans:
            covered[lo:hi] = True
        assert covered.all()
        # Every pair (p, p + d), |d| <= reach, inside the (padded) axis lies in one cropped region.
        for p, step in itertools.product(range(padded), range(1, reach + 1)):
            if p + step < padded:
                assert any(lo <= p and p + step < hi for lo, hi in spans), (axis, p, step)


def test_predict_volume_accepts_every_plan() -> None:
    """The planned geometry passes predict_volume's own coverage check (it raises otherwise)."""
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return {"embedding": x.repeat(1, 2, 1, 1, 1), "foreground": x}

    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -5, 0], [0, 0, -5]]
    for shape in [(9, 40, 37), (3, 12, 70)]:
        plan = plan_windows(request(), shape)
        raw = np.random.default_rng(0).random(shape, dtype=np.float32)
        affinities, _ = predict_volume(Tiny(), raw, window=plan.window, stride=plan.stride, margin=(1, 2, 2),
                                       offsets=offsets, delta_d=1.0, progress=False)  # fmt: skip
        assert affinities.shape == (6, *shape) and np.isfinite(affinities).all()


def test_small_volume_is_one_window_per_axis_padded_by_less_than_a_factor() -> None:
    plan = plan_windows(request(factors=(4, 16, 16)), (25, 250, 250))
    assert plan.counts == (1, 1, 1) and plan.window == (28, 256, 256) and plan.windows == 1
    plan = plan_windows(request(factors=(4, 4, 4)), (50, 100, 200))
    assert plan.window == (52, 100, 200) and plan.counts == (1, 1, 1)


def test_windows_are_spread_evenly() -> None:
    # 300 voxels, window 100, at most stride 92: 4 windows 0, 67, 134, 200 (not 0, 92, 184, 200).
    assert spread_stride(300, 100, 92) == 67
    assert window_starts(300, 100, 67) == [0, 67, 134, 200]
    for size, window, most in itertools.product(range(20, 200, 7), (16, 32), (1, 5, 12)):
        if size < window:
            continue
        stride = spread_stride(size, window, most)
        starts = window_starts(size, window, stride)
        fewest = -(-(size - window) // most) + 1 if size > window else 1
        assert stride <= most and len(starts) == fewest
        gaps = np.diff(starts)
        assert gaps.size == 0 or gaps.max() - gaps.min() <= len(starts)  # no near-duplicate last window


def test_memory_budget_bounds_the_window_and_the_batch() -> None:
    for budget in (5e8, 1e8, 2e7, 5e6):
        plan = plan_windows(request(memory_budget=budget), (64, 512, 512))
        assert np.prod(plan.window) * 400.0 * plan.batch_size <= budget
    large, small = (plan_windows(request(memory_budget=b), (64, 512, 512)) for b in (5e8, 2e7))
    assert np.prod(large.window) > np.prod(small.window) and small.windows > large.windows
    with pytest.raises(ConfigError, match="INFERENCE.MEMORY_BUDGET_GB"):
        plan_windows(request(memory_budget=1e4), (64, 512, 512))


def test_overlap_maps_to_stride() -> None:
    # Voxels, fractions, and never below 2 * margin + reach.
    assert required_overlap((16, 64, 64), (4, 16, 16), (1, 2, 2), (2, 5, 5)) == [4, 16, 16]
    assert required_overlap((16, 64, 64), (0.25, 0.5, 0.1), (1, 2, 2), (2, 5, 5)) == [4, 32, 9]
    assert required_overlap((16, 64, 64), (0, 0, 0), (1, 2, 2), (2, 5, 5)) == [4, 9, 9]
    plan = plan_block_windows(request(window=(16, 64, 64), overlap=(4, 16, 16), batch_size=2))
    assert plan.window == (16, 64, 64) and plan.stride == (12, 48, 48) and plan.batch_size == 2
    cfg = load_cfg(None, MODEL + ["INFERENCE.OVERLAP", "[2, 0.5, 8]", "INFERENCE.MARGIN", "[0, 2, 2]"])
    assert resolve_windows(cfg) == ([8, 32, 32], [6, 16, 23], [0, 2, 2])  # x: 2 * 2 + 5 > 8


def test_explicit_window_and_stride_are_honoured() -> None:
    explicit = MODEL + ["INFERENCE.WINDOW_SIZE", "[8, 64, 32]", "INFERENCE.STRIDE", "[4, 20, 16]"]
    options = build_predict_options(load_cfg(None, explicit))
    for planned in (options, options.plan_for((20, 300, 300)), options.plan_for((5, 10, 10))):
        assert planned.window == (8, 64, 32) and planned.stride == (4, 20, 16) and planned.batch_size == 4
    # Explicit window, no stride, no overlap: the old default (half the window, lowered for margins).
    legacy = build_predict_options(load_cfg(None, MODEL + ["INFERENCE.MARGIN", "[1, 8, 8]"]))
    assert legacy.window == (8, 32, 32) and legacy.stride == (4, 11, 11)
    assert legacy.plan_for((40, 400, 400)).stride == (4, 11, 11)


def test_auto_options_plan_per_volume_and_fingerprint_the_plan() -> None:
    options = build_predict_options(load_cfg(None, AUTO + ["INFERENCE.OVERLAP", "[2, 8, 8]"]))
    small, large = options.plan_for((10, 60, 60)), options.plan_for((40, 700, 700))
    assert small.window == (10, 60, 60) and large.window[1] < 700
    assert small.fingerprint()["window"] == [10, 60, 60] and small.fingerprint() != large.fingerprint()
    assert large.predict_kwargs()["window"] == list(large.window)
    assert options.plan_for((10, 60, 60)) == small  # deterministic
    # TTA with the y-x transpose needs square windows.
    square = build_predict_options(load_cfg(None, AUTO + ["INFERENCE.TTA", "t"])).plan_for((10, 60, 100))
    assert square.window[1] == square.window[2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["INFERENCE.OVERLAP", "[1.5, 2, 2]"], "INFERENCE.OVERLAP: got"),
        (["INFERENCE.OVERLAP", "[2, 2]"], "INFERENCE.OVERLAP: got"),
        (["INFERENCE.OVERLAP", "[-1, 2, 2]"], "INFERENCE.OVERLAP: got"),
        (["INFERENCE.OVERLAP", "[8, 0, 0]"], "INFERENCE.OVERLAP: leaves no stride"),
        (["INFERENCE.BACKEND", "tensorrt"], "INFERENCE.BACKEND must be one of auto, torch, onnxruntime, openvino"),
        (["INFERENCE.WINDOW_SIZE", "huge"], "INFERENCE.WINDOW_SIZE: got 'huge', expected auto or 3 integers"),
        (["INFERENCE.WINDOW_SIZE", "auto", "INFERENCE.STRIDE", "[4, 16, 16]"], "INFERENCE.STRIDE: got"),
        (["INFERENCE.MEMORY_BUDGET_GB", "0"], "INFERENCE.MEMORY_BUDGET_GB"),
        (["INFERENCE.BATCH_SIZE", "-1"], "INFERENCE.BATCH_SIZE"),
    ],
)
def test_bad_values_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_cfg(None, MODEL + overrides)


def test_backend_reaches_the_options() -> None:
    options = build_predict_options(load_cfg(None, MODEL + ["INFERENCE.BACKEND", "onnxruntime"]))
    assert options.backend == "onnxruntime"
    assert options.predict_kwargs().get("backend", "onnxruntime") == "onnxruntime"


def test_concurrent_tta_passes_count_in_the_memory_estimate() -> None:
    from melecole.inference.options import window_request
    from melecole.inference.planner import activation_bytes_per_voxel

    one = activation_bytes_per_voxel([8, 16], [False], 4, 12, variants=2, concurrent=1)
    two = activation_bytes_per_voxel([8, 16], [False], 4, 12, variants=2, concurrent=2)
    affinities = 4.0 * 2 * 12 * 2  # per variant and accumulated, float32: not doubled by concurrency
    assert two - affinities == pytest.approx(2 * (one - affinities))

    def per_voxel(*overrides: str) -> float:
        return window_request(load_cfg(None, AUTO + ["HARDWARE.NUM_THREADS", "2", *overrides])).bytes_per_voxel

    # OpenVINO (and auto, which picks it on CPU) runs the two x-flip passes together on 2 threads.
    assert per_voxel("INFERENCE.TTA", "x", "INFERENCE.BACKEND", "openvino") == pytest.approx(two)
    assert per_voxel("INFERENCE.TTA", "x", "INFERENCE.BACKEND", "auto") == pytest.approx(two)
    assert per_voxel("INFERENCE.TTA", "x", "INFERENCE.BACKEND", "torch") == pytest.approx(one)
    assert per_voxel("INFERENCE.TTA", "x", "INFERENCE.BACKEND", "openvino", "HARDWARE.NUM_THREADS", "1") == (
        pytest.approx(one)
    )
