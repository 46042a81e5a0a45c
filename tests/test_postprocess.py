import numpy as np

from melecole.evaluation import evaluate_segmentation
from melecole.segmentation.postprocess import fill_background, postprocess_segmentation, remove_small_segments


def two_objects() -> np.ndarray:
    gt = np.zeros((4, 8, 8), np.uint64)
    gt[:, :, :4] = 1
    gt[:, :, 4:] = 2
    return gt


def test_fill_background_takes_nearest_segment():
    seg = two_objects()
    seg[:, :, 3:5] = 0  # a boundary band as the foreground mask leaves it
    filled = fill_background(seg)
    np.testing.assert_array_equal(filled, two_objects())
    assert fill_background(np.zeros((2, 3, 3), np.uint64)).max() == 0


def test_remove_small_segments_only_drops_small_ids():
    seg = two_objects()
    seg[0, 0, 0] = 7
    cleaned = remove_small_segments(seg, min_size=2)
    assert 7 not in cleaned and set(np.unique(cleaned)) == {0, 1, 2}
    assert remove_small_segments(seg, min_size=0) is seg


def test_postprocess_improves_masked_segmentation_and_renumbers():
    gt = two_objects()
    seg = gt * 10
    seg[:, :, 3:5] = 0
    seg[1, 1, 1] = 99  # a one-voxel fragment
    before = evaluate_segmentation(seg, gt, top_k=0)
    result = postprocess_segmentation(seg, min_size=2)
    after = evaluate_segmentation(result, gt, top_k=0)
    assert result.dtype == np.uint64 and set(np.unique(result)) == {1, 2}
    assert after.vi_total == 0.0 and after.arand == 0.0
    assert before.vi_total > 0.0
    assert seg[1, 1, 1] == 99  # input untouched
