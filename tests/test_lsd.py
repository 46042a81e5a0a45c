"""Local shape descriptors (melecole.data.lsd) and their head, loss term, loader entry and config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melecole.config import load_cfg
from melecole.data.lsd import LSD_CHANNELS, local_shape_descriptors
from melecole.errors import ConfigError
from melecole.losses.metric import MetricLoss
from melecole.models import build_model


def _brute_force(labels: np.ndarray, point: tuple, radius: tuple) -> np.ndarray:
    """The descriptor of one voxel from its definition (module docstring), in float64."""
    label = labels[point]
    low = [max(0, p - r) for p, r in zip(point, radius)]
    high = [min(n, p + r + 1) for p, r, n in zip(point, radius, labels.shape)]
    window = labels[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    coords = np.argwhere(window == label).astype(np.float64) + np.array(low)
    full = np.array([r * (r + 1) / 3.0 for r in radius])
    mean = coords.mean(0)
    centred = coords - mean
    covariance = centred.T @ centred / len(coords)
    size = len(coords) / np.prod([2 * r + 1 for r in radius])
    offset = 0.5 + 0.5 * (mean - np.array(point)) / np.array(radius)
    variance = np.diag(covariance) / full
    pairs = [(0, 1), (0, 2), (1, 2)]
    cross = [0.5 + 0.5 * covariance[a, b] / np.sqrt(full[a] * full[b]) for a, b in pairs]
    return np.clip(np.concatenate([[size], offset, variance, cross]), 0.0, 1.0)


def test_descriptors_match_their_definition_on_random_objects():
    rng = np.random.default_rng(3)
    # Blocky random objects with large, non-consecutive ids and some background.
    coarse = rng.choice([0, 7, 1000, 2**40, 5], size=(4, 5, 6))
    labels = np.kron(coarse, np.ones((3, 3, 3), dtype=np.int64))
    radius = (2, 3, 4)
    descriptors = local_shape_descriptors(labels, radius)
    assert descriptors.shape == (LSD_CHANNELS,) + labels.shape and descriptors.dtype == np.float32
    assert np.all(descriptors[:, labels == 0] == 0)
    points = np.argwhere(labels != 0)
    for point in points[rng.choice(len(points), 60, replace=False)]:
        expected = _brute_force(labels, tuple(point), radius)
        np.testing.assert_allclose(descriptors[(slice(None),) + tuple(point)], expected, atol=2e-5)


def test_descriptor_of_a_filled_window_and_of_a_sheet():
    radius = (2, 2, 2)
    filled = local_shape_descriptors(np.ones((9, 9, 9), dtype=np.uint8), radius)
    # Window entirely inside the object: everything present, centred, full spread, no correlation.
    np.testing.assert_allclose(filled[:, 4, 4, 4], [1, 0.5, 0.5, 0.5, 1, 1, 1, 0.5, 0.5, 0.5], atol=1e-6)
    sheet = np.zeros((9, 9, 9), dtype=np.uint8)
    sheet[4] = 1  # one z plane: no spread along z
    descriptor = local_shape_descriptors(sheet, radius)[:, 4, 4, 4]
    np.testing.assert_allclose(descriptor[[0, 4, 5, 6]], [1 / 5, 0, 1, 1], atol=1e-6)
    # At the sheet's corner the object lies towards +y, +x only: offsets above 0.5.
    corner = local_shape_descriptors(sheet, radius)[:, 4, 0, 0]
    assert corner[2] > 0.5 and corner[3] > 0.5 and corner[1] == pytest.approx(0.5)


@pytest.mark.parametrize("radius", [(0, 1, 1), (2, 2)])
def test_bad_radius_is_refused(radius):
    with pytest.raises(ValueError, match="radius must be 3 integers >= 1"):
        local_shape_descriptors(np.ones((4, 4, 4), dtype=np.int64), radius)


def _lsd_cfg(*opts: str):
    return load_cfg("configs/synthetic-UNet3D.yaml", ["MODEL.LSD_HEAD", "True", "LOSS.LSD_WEIGHT", "1.0", *opts])


def test_head_is_trained_only_in_training_mode():
    model = build_model(_lsd_cfg())
    raw = torch.rand(1, 1, 16, 64, 64)
    outputs = model.train()(raw)
    assert outputs["lsd"].shape == (1, LSD_CHANNELS, 16, 64, 64)
    with torch.no_grad():
        assert set(model.eval()(raw)) == {"embedding", "foreground"}


def test_lsd_term_is_a_masked_mean_squared_error_with_gradient():
    criterion = MetricLoss(lsd_weight=2.0)
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    labels[0, 0] = 1
    logits = torch.zeros(1, LSD_CHANNELS, 2, 4, 4, requires_grad=True)
    target = torch.full((1, LSD_CHANNELS, 2, 4, 4), 0.5)
    target[:, :, 1] = 1.0  # background voxels: ignored whatever they hold
    outputs = {"embedding": torch.randn(1, 3, 2, 4, 4), "foreground": torch.zeros(1, 1, 2, 4, 4), "lsd": logits}
    total, terms = criterion(outputs, labels, target)
    assert float(terms["lsd"].detach()) == pytest.approx(0.0)
    target[:, 0, 0] = 1.0  # one channel off by 0.5 on the labelled half
    total, terms = criterion(outputs, labels, target)
    assert float(terms["lsd"].detach()) == pytest.approx(0.25 / LSD_CHANNELS)
    without, _ = MetricLoss()(outputs, labels)
    assert float((total - without).detach()) == pytest.approx(2.0 * 0.25 / LSD_CHANNELS, rel=1e-5)
    total.backward()
    assert logits.grad[:, 0, 0].abs().min() > 0 and logits.grad[:, :, 1].abs().max() == 0
    # No head output (an evaluating network) or no target: the term is 0.
    _, terms = criterion({k: v for k, v in outputs.items() if k != "lsd"}, labels, target)
    assert float(terms["lsd"].detach()) == 0.0


def test_loader_gives_descriptors_of_its_labels(tmp_path):
    from melecole.data.dataset import build_train_loader
    from melecole.data.synthetic import generate_dataset

    generate_dataset(tmp_path, seed=1, shape=(20, 80, 80), splits={"train": 1})
    cfg = _lsd_cfg("DATASET.DATA_ROOT", str(tmp_path), "HARDWARE.NUM_WORKERS", "0", "LOSS.LSD_RADIUS", "[2, 4, 4]")
    batch = next(iter(build_train_loader(cfg)))
    labels, lsd = batch["labels"], batch["lsd"]
    assert lsd.shape == (labels.shape[0], LSD_CHANNELS) + tuple(labels.shape[1:])
    np.testing.assert_array_equal(lsd[0].numpy(), local_shape_descriptors(labels[0].numpy(), (2, 4, 4)))
    assert float(lsd[0, 0][labels[0] != 0].min()) > 0


@pytest.mark.parametrize(
    "opts", [["MODEL.LSD_HEAD", "True"], ["LOSS.LSD_WEIGHT", "0.5"]], ids=["head-without-loss", "loss-without-head"]
)
def test_head_and_loss_must_agree(opts):
    with pytest.raises(ConfigError, match="MODEL.LSD_HEAD .* and LOSS.LSD_WEIGHT .* disagree"):
        load_cfg("configs/synthetic-UNet3D.yaml", opts)


def test_bad_radius_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"LOSS.LSD_RADIUS: got \[8, 0, 8\], expected 3 integers >= 1"):
        _lsd_cfg("LOSS.LSD_RADIUS", "[8, 0, 8]")


def test_checkpoint_with_the_head_evaluates_under_a_config_without_it(tmp_path):
    from melecole.engine.checkpoint import build_model_from_checkpoint, save_checkpoint

    cfg = _lsd_cfg()
    model = build_model(cfg)
    path = tmp_path / "lsd.pt"
    save_checkpoint(path, model=model, cfg=cfg, iteration=1)
    plain_cfg = load_cfg("configs/synthetic-UNet3D.yaml")
    evaluated, _, _ = build_model_from_checkpoint(path, plain_cfg)
    assert evaluated.lsd_head is None
    raw = torch.rand(1, 1, 16, 64, 64)
    with torch.no_grad():
        expected = model.eval()(raw)
        got = evaluated(raw)
    torch.testing.assert_close(got["embedding"], expected["embedding"])
    torch.testing.assert_close(got["foreground"], expected["foreground"])
