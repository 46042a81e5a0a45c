"""Metric loss: values on perfect / random embeddings, agreement with the loop reference, invariants."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from melecole.config import load_cfg
from melecole.losses import MetricLoss, build_criterion
from melecole.losses.metric import TERM_NAMES
from melecole.testing import reference_metric_loss

DELTA_V, DELTA_D = 0.5, 1.5


def block_labels(batch: int = 2, shape=(2, 6, 6)) -> torch.Tensor:
    """(B, Z, Y, X) labels: four quadrant objects per patch and a one-voxel-wide boundary of 0."""
    labels = torch.zeros(batch, *shape, dtype=torch.int64)
    half_y, half_x = shape[1] // 2, shape[2] // 2
    labels[:, :, :half_y, :half_x] = 1
    labels[:, :, :half_y, half_x:] = 2
    labels[:, :, half_y:, :half_x] = 3
    labels[:, :, half_y:, half_x:] = 4
    labels[:, :, half_y, :] = 0
    return labels


def mixed_batch(generator: torch.Generator) -> torch.Tensor:
    """(4, 3, 6, 7) labels: random ids, a patch with one object, one without any, large ids."""
    labels = torch.randint(0, 6, (4, 3, 6, 7), generator=generator)
    labels[1] = torch.where(labels[1] > 2, 9, 0)  # exactly one object (id 9)
    labels[2] = 0  # no object at all
    labels[3] = labels[3] * 1_000_003  # large, sparse ids
    return labels


def perfect_outputs(labels: torch.Tensor, dim: int = 4) -> dict:
    """Each object gets a constant embedding; objects are 4 * delta_d apart, logits are confident."""
    codes = torch.zeros(int(labels.max()) + 1, dim)
    for object_id in range(1, codes.shape[0]):
        codes[object_id, (object_id - 1) % dim] = 4 * DELTA_D * (1 + (object_id - 1) // dim)
    embedding = codes[labels].permute(0, 4, 1, 2, 3).contiguous()
    foreground = torch.where(labels[:, None] != 0, 30.0, -30.0)
    return {"embedding": embedding, "foreground": foreground}


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_perfect_embedding_is_near_zero(norm) -> None:
    labels = block_labels()
    criterion = MetricLoss(DELTA_V, DELTA_D, gamma=0.0, norm=norm, foreground_weight=1.0)
    total, terms = criterion(perfect_outputs(labels), labels)
    assert set(terms) == set(TERM_NAMES)
    assert total.item() < 1e-4
    assert terms["pull"].item() < 1e-8 and terms["push"].item() < 1e-8


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_random_embedding_is_large(norm) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = block_labels()
    outputs = {
        "embedding": 0.1 * torch.randn(2, 4, 2, 6, 6, generator=generator),
        "foreground": torch.randn(2, 1, 2, 6, 6, generator=generator),
    }
    total, terms = MetricLoss(DELTA_V, DELTA_D, norm=norm)(outputs, labels)
    # Means of small random vectors are close: every pair pays almost (2 delta_d)^2 = 9.
    assert terms["push"].item() > 5.0
    assert total.item() > 5.0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradients_are_finite_and_non_zero(norm) -> None:
    generator = torch.Generator().manual_seed(1)
    labels = block_labels()
    embedding = torch.randn(2, 4, 2, 6, 6, generator=generator, requires_grad=True)
    foreground = torch.randn(2, 1, 2, 6, 6, generator=generator, requires_grad=True)
    total, _ = MetricLoss(DELTA_V, DELTA_D, norm=norm)(
        {"embedding": embedding, "foreground": foreground}, labels
    )
    total.backward()
    for tensor in (embedding, foreground):
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradients_finite_when_embeddings_coincide(norm) -> None:
    # All voxels equal: every distance is 0, where a plain sqrt would give NaN gradients.
    labels = block_labels()
    embedding = torch.zeros(2, 4, 2, 6, 6, requires_grad=True)
    total, _ = MetricLoss(DELTA_V, DELTA_D, norm=norm, foreground_weight=0.0)(
        {"embedding": embedding}, labels
    )
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(embedding.grad).all()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_matches_loop_reference(norm) -> None:
    generator = torch.Generator().manual_seed(2)
    labels = mixed_batch(generator)
    weights = dict(alpha=1.3, beta=0.7, gamma=0.25)
    embedding = torch.randn(4, 5, 3, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    reference_embedding = embedding.detach().clone().requires_grad_(True)

    criterion = MetricLoss(DELTA_V, DELTA_D, norm=norm, foreground_weight=0.0, **weights)
    _, terms = criterion({"embedding": embedding}, labels)
    expected = reference_metric_loss(reference_embedding, labels, DELTA_V, DELTA_D, norm=norm, **weights)
    for name in ("pull", "push", "regularizer", "metric"):
        assert terms[name].item() == pytest.approx(expected[name].item(), abs=1e-5), name
    assert terms["push"].item() > 0 and terms["pull"].item() > 0

    terms["metric"].backward()
    expected["metric"].backward()
    assert torch.allclose(embedding.grad, reference_embedding.grad, atol=1e-5)


def test_matches_reference_in_float32() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = mixed_batch(generator)
    embedding = torch.randn(4, 5, 3, 6, 7, generator=generator)
    _, terms = MetricLoss(DELTA_V, DELTA_D, gamma=0.1, foreground_weight=0.0)(
        {"embedding": embedding}, labels
    )
    expected = reference_metric_loss(embedding, labels, DELTA_V, DELTA_D, gamma=0.1)
    assert terms["metric"].item() == pytest.approx(expected["metric"].item(), abs=1e-5)


def test_ids_are_per_patch() -> None:
    # Id 1 in patch 0 and id 1 in patch 1 are different objects: shifting patch 1's embedding by a
    # constant changes nothing (no push across patches) except the regulariser.
    labels = block_labels()
    generator = torch.Generator().manual_seed(4)
    embedding = torch.randn(2, 4, 2, 6, 6, generator=generator)
    shifted = embedding.clone()
    shifted[1] += 100.0
    criterion = MetricLoss(DELTA_V, DELTA_D, gamma=0.0, foreground_weight=0.0)
    _, before = criterion({"embedding": embedding}, labels)
    _, after = criterion({"embedding": shifted}, labels)
    assert after["metric"].item() == pytest.approx(before["metric"].item(), abs=1e-4)


def test_label_zero_is_ignored() -> None:
    generator = torch.Generator().manual_seed(5)
    labels = block_labels()
    embedding = torch.randn(2, 4, 2, 6, 6, generator=generator)
    changed = embedding.clone()
    background = (labels == 0)[:, None].expand_as(changed)
    changed[background] = 1000.0 * torch.randn(int(background.sum()), generator=generator)
    criterion = MetricLoss(DELTA_V, DELTA_D, foreground_weight=1.0)
    foreground = torch.zeros(2, 1, 2, 6, 6)
    _, before = criterion({"embedding": embedding, "foreground": foreground}, labels)
    _, after = criterion({"embedding": changed, "foreground": foreground}, labels)
    for name in ("pull", "push", "regularizer", "metric"):
        assert after[name].item() == pytest.approx(before[name].item(), rel=1e-6), name


def test_gamma_multiplies_the_regulariser() -> None:
    generator = torch.Generator().manual_seed(6)
    labels = block_labels()
    outputs = {"embedding": torch.randn(2, 4, 2, 6, 6, generator=generator)}
    _, without = MetricLoss(DELTA_V, DELTA_D, gamma=0.0, foreground_weight=0.0)(outputs, labels)
    _, with_gamma = MetricLoss(DELTA_V, DELTA_D, gamma=2.5, foreground_weight=0.0)(outputs, labels)
    regularizer = with_gamma["regularizer"].item()
    assert regularizer > 0
    assert with_gamma["metric"].item() - without["metric"].item() == pytest.approx(
        2.5 * regularizer, rel=1e-5
    )


def test_no_objects_gives_zero_without_nan() -> None:
    labels = torch.zeros(2, 2, 4, 4, dtype=torch.int64)
    embedding = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    foreground = torch.randn(2, 1, 2, 4, 4, requires_grad=True)
    total, terms = MetricLoss(DELTA_V, DELTA_D)({"embedding": embedding, "foreground": foreground}, labels)
    assert terms["metric"].item() == 0.0
    assert all(torch.isfinite(value) for value in terms.values())
    total.backward()
    assert torch.isfinite(embedding.grad).all() and embedding.grad.abs().sum() == 0
    assert foreground.grad.abs().sum() > 0  # the foreground head still learns "all background"


def test_single_object_has_no_push() -> None:
    labels = torch.ones(1, 2, 4, 4, dtype=torch.int64)
    embedding = torch.randn(1, 3, 2, 4, 4)
    _, terms = MetricLoss(DELTA_V, DELTA_D, foreground_weight=0.0)({"embedding": embedding}, labels)
    assert terms["push"].item() == 0.0
    assert terms["pull"].item() > 0.0


def test_foreground_term_and_weight() -> None:
    generator = torch.Generator().manual_seed(7)
    labels = block_labels()
    outputs = {
        "embedding": torch.randn(2, 4, 2, 6, 6, generator=generator),
        "foreground": torch.randn(2, 1, 2, 6, 6, generator=generator),
    }
    expected = F.binary_cross_entropy_with_logits(outputs["foreground"], (labels[:, None] != 0).float())
    total, terms = MetricLoss(DELTA_V, DELTA_D, foreground_weight=0.5)(outputs, labels)
    assert terms["foreground"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() == pytest.approx(terms["metric"].item() + 0.5 * expected.item(), rel=1e-6)
    assert terms["total"] is total
    # Weight 0 disables it: no foreground output needed.
    total, terms = MetricLoss(DELTA_V, DELTA_D, foreground_weight=0.0)(
        {"embedding": outputs["embedding"]}, labels
    )
    assert total.item() == pytest.approx(terms["metric"].item())


def test_shape_mismatch_is_clear() -> None:
    with pytest.raises(ValueError, match="labels shape"):
        MetricLoss(foreground_weight=0.0)({"embedding": torch.randn(1, 3, 2, 4, 4)}, torch.ones(1, 2, 4, 5))


def test_build_criterion_reads_loss_keys() -> None:
    cfg = load_cfg(opts=["LOSS.NORM", "l1", "LOSS.GAMMA", "0.5", "LOSS.DELTA_D", "2.0"])
    criterion = build_criterion(cfg)
    assert isinstance(criterion, MetricLoss)
    assert (criterion.norm, criterion.gamma, criterion.delta_d) == ("l1", 0.5, 2.0)
    assert criterion.foreground_weight == cfg.LOSS.FOREGROUND_WEIGHT
    with pytest.raises(ValueError, match="l1, l2"):
        MetricLoss(norm="cosine")


OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -2, 0), (0, 0, 3), (1, -2, 2)]


def naive_affinity_term(embedding: torch.Tensor, labels: torch.Tensor, offsets, norm: str) -> float:
    """Pair-by-pair loop: 0.5 * (mean (1 - a)^2 over same-id pairs + mean a^2 over different-id)."""
    same, different = [], []
    batch, _, depth, height, width = embedding.shape
    for b in range(batch):
        for z, y, x in torch.cartesian_prod(torch.arange(depth), torch.arange(height), torch.arange(width)).tolist():
            for dz, dy, dx in offsets:
                q = (z + dz, y + dy, x + dx)
                if not all(0 <= v < s for v, s in zip(q, (depth, height, width))):
                    continue
                first, second = int(labels[b, z, y, x]), int(labels[(b,) + q])
                if first == 0 or second == 0:
                    continue
                difference = embedding[b, :, z, y, x] - embedding[(b, slice(None)) + q]
                distance = difference.abs().sum() if norm == "l1" else difference.norm()
                affinity = max(0.0, 1.0 - float(distance) / (2 * DELTA_D)) ** 2
                (same if first == second else different).append(affinity)
    terms = []
    if same:
        terms.append(sum((1 - a) ** 2 for a in same) / len(same))
    if different:
        terms.append(sum(a**2 for a in different) / len(different))
    return 0.5 * sum(terms)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_affinity_term_matches_pair_loop(norm) -> None:
    from melecole.losses.metric import affinity_loss_term

    generator = torch.Generator().manual_seed(3)
    labels = mixed_batch(generator)
    embedding = torch.randn(4, 3, 3, 6, 7, generator=generator, dtype=torch.float64)
    value = affinity_loss_term(embedding, labels, OFFSETS, DELTA_D, norm)
    expected = naive_affinity_term(embedding, labels, OFFSETS, norm)
    assert expected > 0.05
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_affinity_term_uses_the_inference_affinities() -> None:
    """The loss drives exactly the numbers inference reads: its per-pair affinity is the one of
    melecole.inference.affinities.embeddings_to_affinities."""
    from melecole.inference.affinities import embeddings_to_affinities
    from melecole.losses.metric import affinity_loss_term

    generator = torch.Generator().manual_seed(5)
    embedding = torch.randn(1, 4, 3, 5, 5, generator=generator)
    labels = torch.ones(1, 3, 5, 5, dtype=torch.int64)  # one object: every pair is "same"
    offsets = [(0, 0, -1)]
    affinities = embeddings_to_affinities(embedding[0], offsets, DELTA_D)[0, :, :, 1:]
    expected = 0.5 * (1 - affinities).pow(2).mean().item()
    assert affinity_loss_term(embedding, labels, offsets, DELTA_D).item() == pytest.approx(expected, rel=1e-5)


def test_affinity_weight_adds_the_term_and_separates_boundaries() -> None:
    labels = block_labels()
    outputs = perfect_outputs(labels)
    criterion = MetricLoss(DELTA_V, DELTA_D, gamma=0.0, affinity_weight=2.0, offsets=OFFSETS)
    _, terms = criterion(outputs, labels)
    assert terms["affinity"].item() < 1e-8  # perfect embeddings: a = 1 inside, 0 across
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(2, 4, 2, 6, 6, generator=generator, requires_grad=True)
    inputs = {"embedding": embedding, "foreground": outputs["foreground"]}
    plain = MetricLoss(DELTA_V, DELTA_D, gamma=0.0)(inputs, labels)
    total, terms = criterion({"embedding": embedding, "foreground": outputs["foreground"]}, labels)
    assert terms["affinity"].item() > 0.01
    assert total.item() == pytest.approx(plain[0].item() + 2.0 * terms["affinity"].item(), rel=1e-6)
    assert plain[1]["affinity"].item() == 0.0
    total.backward()
    assert torch.isfinite(embedding.grad).all() and embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="INFERENCE.OFFSETS"):
        MetricLoss(affinity_weight=1.0)


def test_build_criterion_passes_affinity_weight_and_offsets() -> None:
    cfg = load_cfg(opts=["LOSS.AFFINITY_WEIGHT", "0.5"])
    criterion = build_criterion(cfg)
    assert criterion.affinity_weight == 0.5
    assert criterion.offsets == [tuple(offset) for offset in cfg.INFERENCE.OFFSETS]
