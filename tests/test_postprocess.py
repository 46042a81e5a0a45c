import numpy as np
import pytest

from melecole.evaluation import evaluate_segmentation
from melecole.segmentation.postprocess import (
    fill_background,
    fill_heightmap,
    postprocess_segmentation,
    remove_small_segments,
)


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


def test_watershed_fill_follows_the_height_map_not_the_distance():
    seg = np.zeros((1, 1, 7), np.uint64)
    seg[0, 0, 0], seg[0, 0, 6] = 1, 2
    # The membrane (highest point) is at x = 5: voxel 4 is nearer to segment 2 but on segment 1's side.
    heights = np.array([[[0.0, 0.1, 0.1, 0.1, 0.1, 0.9, 0.0]]], np.float32)
    assert fill_background(seg).tolist() == [[[1, 1, 1, 1, 2, 2, 2]]]
    assert fill_background(seg, heightmap=heights).tolist() == [[[1, 1, 1, 1, 1, 2, 2]]]
    assert fill_heightmap(1.0 - heights).dtype == np.float32
    np.testing.assert_allclose(fill_heightmap(1.0 - heights), heights, atol=1e-7)
    assert fill_heightmap(heights, "nearest") is None and fill_heightmap(None) is None


def test_watershed_fill_falls_back_to_nearest_and_keeps_the_dtype():
    seg = np.zeros((2, 4, 4), np.uint16)  # not a watershed marker dtype
    seg[0, 0, 0] = 3
    filled = fill_background(seg, heightmap=np.zeros(seg.shape, np.float32))
    assert filled.dtype == np.uint16 and np.all(filled == 3)
    with pytest.raises(ValueError, match="heightmap shape"):
        fill_background(seg, heightmap=np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="unknown fill mode 'closest'"):
        fill_heightmap(np.ones(seg.shape), "closest")


def test_watershed_fill_scores_better_on_a_blurred_membrane():
    """Two objects whose boundary is not in the middle of the masked band: the watershed on
    1 - foreground finds it, the nearest fill splits the band in half."""
    gt = np.zeros((2, 8, 16), np.uint64)
    gt[:, :, :6] = 1
    gt[:, :, 6:] = 2
    foreground = np.ones(gt.shape, np.float32)
    foreground[:, :, 2:12] = np.abs(np.arange(2, 12) - 5.5)[None, None] / 10  # lowest at the true boundary
    seg = gt.copy()
    seg[foreground < 0.98] = 0
    nearest = postprocess_segmentation(seg)
    flooded = postprocess_segmentation(seg, heightmap=fill_heightmap(foreground))
    assert evaluate_segmentation(flooded, gt).vi_total == pytest.approx(0.0, abs=1e-9)
    assert evaluate_segmentation(nearest, gt).vi_total > 0.1
