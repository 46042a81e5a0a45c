"""melecole.evaluation: VI split/merge, adapted Rand, offenders, alignment, CC baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.metrics

from melecole.errors import DataError
from melecole.evaluation import (
    adapted_rand_error,
    align_to_gt,
    connected_components_baseline,
    contingency_table,
    evaluate_segmentation,
    foreground_probability,
    scores_from_table,
    variation_of_information,
)

# 4x4 hand-built labels: GT has four 2x2 quadrants.
GT = np.array(
    [
        [1, 1, 2, 2],
        [1, 1, 2, 2],
        [3, 3, 4, 4],
        [3, 3, 4, 4],
    ],
    dtype=np.uint64,
)


def _random_pair(seed: int, shape=(3, 12, 12), n_gt: int = 6, n_seg: int = 9, zeros: bool = True):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0 if zeros else 1, n_gt, shape).astype(np.uint64)
    # Correlated prediction: mostly a relabelled GT with noise, so scores are neither 0 nor maximal.
    seg = (gt * 3 + 5).astype(np.uint64)
    noise = rng.random(shape) < 0.3
    seg[noise] = rng.integers(0 if zeros else 1, n_seg, int(noise.sum()))
    return seg, gt


def _reference_scores(seg: np.ndarray, gt: np.ndarray, log=np.log2):
    """Direct dense computation of (H(seg|gt), H(gt|seg), ARAND) over all given voxels."""
    _, s = np.unique(seg, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    joint = np.zeros((s.max() + 1, g.max() + 1))
    np.add.at(joint, (s.ravel(), g.ravel()), 1.0)
    n = joint.sum()
    p = joint / n
    ps, pg = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    h_joint = -(p[nz] * log(p[nz])).sum()
    h_seg = -(ps * log(ps)).sum()
    h_gt = -(pg * log(pg)).sum()
    pairs = (joint**2).sum() - n
    fscore = 2 * pairs / ((joint.sum(1) ** 2).sum() - n + (joint.sum(0) ** 2).sum() - n)
    return h_joint - h_gt, h_joint - h_seg, 1 - fscore


def test_identical_segmentation_scores_zero() -> None:
    scores = evaluate_segmentation(GT.copy(), GT)
    assert scores.vi_split == 0 and scores.vi_merge == 0 and scores.vi_total == 0
    assert scores.arand == 0 and scores.rand_precision == 1 and scores.rand_recall == 1
    assert (scores.n_gt, scores.n_seg, scores.n_voxels) == (4, 4, 16)
    assert scores.merge_offenders == [] and scores.split_offenders == []


def test_relabelling_does_not_change_scores() -> None:
    scores = evaluate_segmentation(GT * 1000 + 7, GT)
    assert scores.vi_total == 0 and scores.arand == 0


def test_pure_split_gives_only_split_error() -> None:
    seg = GT.copy()
    seg[0, :2] = 9  # GT object 1 split into two halves of 2 voxels
    split, merge = variation_of_information(seg, GT)
    assert merge == 0
    assert split == pytest.approx(4 / 16 * 1.0)  # p(gt=1) * H(1/2, 1/2) = 1/4 bit
    scores = evaluate_segmentation(seg, GT)
    assert scores.rand_precision == 1 and scores.rand_recall < 1 and scores.arand > 0


def test_pure_merge_gives_only_merge_error() -> None:
    seg = GT.copy()
    seg[seg == 2] = 1  # objects 1 and 2 merged
    split, merge = variation_of_information(seg, GT)
    assert split == 0
    assert merge == pytest.approx(8 / 16 * 1.0)
    scores = evaluate_segmentation(seg, GT)
    assert scores.rand_recall == 1 and scores.rand_precision < 1 and scores.arand > 0


def test_nats_and_bits() -> None:
    seg = np.ones_like(GT)
    bits = variation_of_information(seg, GT)
    nats = variation_of_information(seg, GT, log_base=math.e)
    assert bits == (0.0, pytest.approx(2.0))
    assert nats[1] == pytest.approx(2.0 * math.log(2))
    assert evaluate_segmentation(seg, GT, log_base=math.e).unit == "nats"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_skimage_without_zeros(seed: int) -> None:
    seg, gt = _random_pair(seed, zeros=False)
    scores = evaluate_segmentation(seg, gt)
    # skimage takes (gt, seg) and returns (H(seg|gt), H(gt|seg)) = (split, merge).
    reference_split, reference_merge = skimage.metrics.variation_of_information(gt, seg)
    assert scores.vi_split == pytest.approx(reference_split, abs=1e-10)
    assert scores.vi_merge == pytest.approx(reference_merge, abs=1e-10)
    error, sk_precision, sk_recall = skimage.metrics.adapted_rand_error(gt, seg, ignore_labels=())
    assert scores.arand == pytest.approx(error, abs=1e-10)
    # skimage returns precision and recall swapped (scikit-image issue #6485).
    assert scores.rand_precision == pytest.approx(sk_recall, abs=1e-10)
    assert scores.rand_recall == pytest.approx(sk_precision, abs=1e-10)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_agrees_with_skimage_ignoring_gt_zero(seed: int) -> None:
    seg, gt = _random_pair(seed, zeros=True)
    assert (gt == 0).any() and (seg == 0).any()
    scores = evaluate_segmentation(seg, gt)
    reference = skimage.metrics.variation_of_information(gt, seg, ignore_labels=[0])
    assert (scores.vi_split, scores.vi_merge) == pytest.approx(tuple(reference), abs=1e-10)
    assert scores.arand == pytest.approx(skimage.metrics.adapted_rand_error(gt, seg)[0], abs=1e-10)
    assert adapted_rand_error(seg, gt) == pytest.approx(scores.arand, abs=1e-12)
    # ignore_gt_zero=False treats GT 0 as an object, like skimage without ignore labels.
    split, merge = variation_of_information(seg, gt, ignore_gt_zero=False)
    reference = skimage.metrics.variation_of_information(gt, seg)
    assert (split, merge) == pytest.approx(tuple(reference), abs=1e-10)


@pytest.mark.parametrize("seed", [6, 7])
def test_matches_dense_reference(seed: int) -> None:
    seg, gt = _random_pair(seed)
    keep = gt != 0
    split, merge, arand = _reference_scores(seg[keep], gt[keep])
    scores = evaluate_segmentation(seg, gt)
    assert (scores.vi_split, scores.vi_merge, scores.arand) == pytest.approx((split, merge, arand), abs=1e-10)


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_predicted_zero_is_an_ordinary_segment(seed: int) -> None:
    """Labelling voxels 0 scores exactly like giving them any unused label: nothing is dropped."""
    seg, gt = _random_pair(seed, zeros=True)
    seg[seg == 0] = 1
    rng = np.random.default_rng(seed)
    chosen = rng.random(seg.shape) < rng.uniform(0.05, 0.5)
    zeroed, fresh = seg.copy(), seg.copy()
    zeroed[chosen] = 0
    fresh[chosen] = 10**9
    a, b = evaluate_segmentation(zeroed, gt), evaluate_segmentation(fresh, gt)
    assert a.n_voxels == b.n_voxels == int((gt != 0).sum())
    for name in ("vi_split", "vi_merge", "arand", "rand_precision", "rand_recall", "n_seg"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-12)


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_predicting_background_cannot_hide_errors(seed: int) -> None:
    """Zeroing the wrongly segmented voxels hides them in the original convention, never here."""
    seg, gt = _random_pair(seed, zeros=True)
    gt[gt == 0] = 1
    wrong = seg != gt * 3 + 5
    original = evaluate_segmentation(seg, gt)
    hidden = seg.copy()
    hidden[wrong] = 0
    compat = evaluate_segmentation(hidden, gt, compat_original=True)
    assert compat.vi_total == 0 and compat.arand == 0  # the loophole of the original numbers
    ours = evaluate_segmentation(hidden, gt)
    assert ours.n_voxels == original.n_voxels
    assert ours.vi_merge > 0 and ours.arand > 0  # the zeroed voxels still count, as one big segment


@pytest.mark.parametrize("seed", [30, 31])
def test_compat_original_matches_direct_natural_log(seed: int) -> None:
    seg, gt = _random_pair(seed, zeros=True)
    keep = (gt != 0) & (seg != 0)
    split, merge, arand = _reference_scores(seg[keep], gt[keep], log=np.log)
    scores = evaluate_segmentation(seg, gt, compat_original=True)
    assert (scores.vi_split, scores.vi_merge, scores.arand) == pytest.approx((split, merge, arand), abs=1e-10)
    assert scores.unit == "nats" and scores.compat_original
    assert variation_of_information(seg, gt, compat_original=True) == pytest.approx((split, merge), abs=1e-10)


def test_offenders_name_the_right_ids() -> None:
    gt = np.zeros((2, 6, 6), dtype=np.uint32)
    gt[:, :, 0:2], gt[:, :, 2:4], gt[:, :, 4:6] = 1, 2, 3  # three columns
    gt[:, 5, :] = 5  # a row object
    seg = np.full(gt.shape, 50, dtype=np.uint32)
    seg[:, :5, :] = 7  # segment 7 merges GT 1, 2 and 3
    seg[:, 5, :3], seg[:, 5, 3:] = 10, 11  # GT 5 split into 10 and 11
    scores = evaluate_segmentation(seg, gt, top_k=5)
    assert [o.label for o in scores.merge_offenders] == [7]
    merge = scores.merge_offenders[0]
    assert merge.n_partners == 3 and merge.size == 60
    assert sorted(pid for pid, _ in merge.largest_partners) == [1, 2, 3]
    assert merge.vi_contribution == pytest.approx(scores.vi_merge)
    assert [o.label for o in scores.split_offenders] == [5]
    split = scores.split_offenders[0]
    assert split.n_partners == 2 and split.size == 12
    assert sorted(split.largest_partners) == [(10, 6), (11, 6)]
    assert split.vi_contribution == pytest.approx(scores.vi_split)
    assert evaluate_segmentation(seg, gt, top_k=0).merge_offenders == []
    assert scores.to_dict()["merge_offenders"][0]["label"] == 7


def test_contingency_table_is_chunk_independent_and_keeps_ids() -> None:
    seg, gt = _random_pair(40, shape=(5, 7, 9))
    seg = seg.astype(np.uint64) + np.uint64(2**63)  # ids beyond int64
    whole = contingency_table(seg, gt)
    slabs = contingency_table(seg, gt, chunk_voxels=20)
    for name in ("segmentation_ids", "gt_ids", "pair_segmentation", "pair_gt", "pair_count", "gt_sizes"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(slabs, name))
    assert whole.segmentation_ids.dtype == np.uint64 and whole.segmentation_ids.min() >= 2**63
    assert whole.n_voxels == int((gt != 0).sum()) == whole.pair_count.sum() == whole.gt_sizes.sum()
    assert whole.n_total_voxels == seg.size
    assert scores_from_table(slabs).vi_total == pytest.approx(evaluate_segmentation(seg, gt).vi_total)


def test_scattered_and_negative_ids_give_the_same_scores() -> None:
    """Ids whose ranges overflow one 63-bit key take the renumbering path; negatives wrap correctly."""
    seg, gt = _random_pair(41, shape=(4, 8, 8))
    reference = evaluate_segmentation(seg, gt)
    rng = np.random.default_rng(41)
    seg_lookup = rng.integers(1, 2**64, size=int(seg.max()) + 1, dtype=np.uint64)
    gt_lookup = rng.integers(1, 2**64, size=int(gt.max()) + 1, dtype=np.uint64)
    assert len(set(seg_lookup.tolist())) == seg_lookup.size and len(set(gt_lookup.tolist())) == gt_lookup.size
    gt_lookup[0] = 0
    scattered = contingency_table(seg_lookup[seg], gt_lookup[gt], chunk_voxels=50)
    assert scores_from_table(scattered).vi_total == pytest.approx(reference.vi_total, abs=1e-12)
    assert set(scattered.gt_ids.tolist()) <= set(gt_lookup[1:].tolist())
    negative = evaluate_segmentation(
        seg.astype(np.int64) - 2**62, gt.astype(np.int32) - 3, ignore_gt_zero=False
    )
    shifted = evaluate_segmentation(seg, gt, ignore_gt_zero=False)
    assert negative.vi_total == pytest.approx(shifted.vi_total, abs=1e-12)
    assert negative.arand == pytest.approx(shifted.arand, abs=1e-12)
    extreme = np.array([-(2**63), 2**63 - 1, 0, 0], dtype=np.int64)
    table = contingency_table(extreme, np.array([1, 1, 2, 2], dtype=np.int64))
    assert sorted(table.segmentation_ids.tolist()) == [-(2**63), 0, 2**63 - 1]


def test_signed_bool_and_low_dimensional_labels() -> None:
    seg = np.array([-1, -1, 3, 3, 3], dtype=np.int16)
    gt = np.array([True, True, True, False, True])
    split, merge = variation_of_information(seg, gt)
    assert split > 0 and merge == 0
    assert evaluate_segmentation(GT[:, :1].squeeze(), GT[:, 0]).vi_total == 0


def test_input_errors() -> None:
    with pytest.raises(DataError, match=r"\(4, 4\).*\(4, 3\)"):
        evaluate_segmentation(GT, GT[:, :3])
    with pytest.raises(DataError, match="integer"):
        evaluate_segmentation(GT.astype(np.float32), GT)
    with pytest.raises(DataError, match="no voxels"):
        evaluate_segmentation(GT, np.zeros_like(GT))


def test_align_to_gt_crops_the_padded_volume() -> None:
    gt = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    padded = np.pad(gt, ((1, 1), (2, 2), (0, 0)), constant_values=-1)
    volume, cropped_gt, alignment = align_to_gt(padded, gt)
    np.testing.assert_array_equal(volume, gt)
    assert cropped_gt is gt or np.shares_memory(cropped_gt, gt)
    assert alignment.volume_crop == (1, 2, 0) and alignment.gt_crop == (0, 0, 0) and alignment.changed
    assert "(1, 2, 0)" in alignment.describe()
    # The other way round: a padded GT is cropped to the prediction.
    volume, cropped_gt, alignment = align_to_gt(gt, padded, padding=(1, 2, 0))
    np.testing.assert_array_equal(cropped_gt, gt)
    assert alignment.gt_crop == (1, 2, 0)
    same = align_to_gt(gt, gt)
    assert not same[2].changed and same[2].describe() == "shapes match"


def test_align_to_gt_errors_name_both_shapes() -> None:
    gt = np.zeros((3, 4, 5))
    with pytest.raises(DataError, match=r"seg\.hdf.*\(3, 4, 6\).*gt\.hdf.*\(3, 4, 5\)"):
        align_to_gt(np.zeros((3, 4, 6)), gt, volume_name="seg.hdf", gt_name="gt.hdf")
    with pytest.raises(DataError, match="padding"):
        align_to_gt(np.zeros((5, 4, 5)), gt, padding=(2, 0, 0))
    with pytest.raises(DataError, match="shape"):
        align_to_gt(np.zeros((4, 5)), gt)


def test_connected_components_baseline_uses_face_connectivity() -> None:
    probability = np.zeros((3, 5, 5), dtype=np.float32)
    probability[0, 0:2, 0:2] = 0.9
    probability[1, 2, 2] = 0.8  # touches the first blob only diagonally: separate under 6-connectivity
    probability[2, 4, :] = 0.6
    probability[2, 0, 4] = 0.5  # not strictly above the threshold
    labels = connected_components_baseline(probability, threshold=0.5)
    assert labels.shape == probability.shape
    assert len(np.unique(labels[labels > 0])) == 3 and labels[2, 0, 4] == 0
    assert len(np.unique(connected_components_baseline(probability, threshold=0.7))) == 3  # 2 + background


def test_foreground_probability_scaling_and_checks() -> None:
    scaled = foreground_probability(np.array([[0, 255, 128]], dtype=np.uint8))
    np.testing.assert_allclose(scaled, [[0.0, 1.0, 128 / 255]], rtol=1e-6)
    assert foreground_probability(np.ones((1, 2, 2, 2), dtype=np.float64)).shape == (2, 2, 2)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        foreground_probability(np.array([0.0, 3.0]), name="mem.hdf")
    with pytest.raises(DataError, match="dtype"):
        foreground_probability(np.array([0, 1000], dtype=np.uint16))
