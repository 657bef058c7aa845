"""Tests of minimask.boxes against brute-force references and hand-worked cases."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimask import boxes as B

# ---------------------------------------------------------------------------
# References, written for reading
# ---------------------------------------------------------------------------


def iou_reference(boxes_a, boxes_b):
    """IoU box by box with plain Python floats."""
    out = np.zeros((len(boxes_a), len(boxes_b)))
    for i, (ay1, ax1, ay2, ax2) in enumerate(boxes_a):
        for j, (by1, bx1, by2, bx2) in enumerate(boxes_b):
            inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            inter = inter_h * inter_w
            area_a = max(0.0, ay2 - ay1) * max(0.0, ax2 - ax1)
            area_b = max(0.0, by2 - by1) * max(0.0, bx2 - bx1)
            union = area_a + area_b - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


@st.composite
def box_arrays(draw, min_n=0, max_n=6, min_size=0.5):
    """Valid boxes [n, 4] (y1, x1, y2, x2) with sizes >= min_size."""
    n = draw(st.integers(min_n, max_n))
    corner = draw(hnp.arrays(np.float32, (n, 2), elements=st.floats(-50, 50, width=32)))
    size = draw(hnp.arrays(np.float32, (n, 2), elements=st.floats(min_size, 60, width=32)))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# IoU and area
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(box_arrays(), box_arrays())
def test_iou_matches_brute_force_and_is_symmetric(a, b):
    got = B.iou(a, b).numpy()
    assert got.shape == (len(a), len(b))
    np.testing.assert_allclose(got, iou_reference(a, b), atol=1e-5)
    np.testing.assert_allclose(got, B.iou(b, a).numpy().T, atol=1e-6)
    assert np.all((got >= 0) & (got <= 1 + 1e-6))


@settings(max_examples=30, deadline=None)
@given(box_arrays(min_n=1))
def test_iou_of_a_box_with_itself_is_one(a):
    np.testing.assert_allclose(np.diag(B.iou(a, a).numpy()), 1.0, atol=1e-6)


def test_iou_of_disjoint_and_touching_boxes_is_zero():
    a = np.array([[0, 0, 10, 10]], np.float32)
    # apart; touching it below; touching it on the right
    b = np.array([[20, 20, 30, 30], [10, 0, 20, 10], [0, 10, 10, 20]], np.float32)
    np.testing.assert_array_equal(B.iou(a, b).numpy(), [[0.0, 0.0, 0.0]])


def test_iou_hand_case():
    # Two 10x10 squares overlapping in a 5x10 strip: 50 / (100 + 100 - 50) = 1/3.
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10]], np.float32)
    np.testing.assert_allclose(B.iou(a, b).numpy(), [[1 / 3]], rtol=1e-6)


def test_iou_of_empty_boxes_is_zero_not_nan():
    empty = np.array([[3, 3, 3, 3]], np.float32)
    full = np.array([[0, 0, 10, 10]], np.float32)
    assert B.iou(empty, empty).numpy()[0, 0] == 0.0
    assert B.iou(empty, full).numpy()[0, 0] == 0.0
    assert B.iou(np.zeros((0, 4)), full).shape == (0, 1)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_iou_just_above_and_just_below_a_threshold(threshold):
    # A 10x10 box and the same box shifted right by d: IoU = (10 - d) / (10 + d),
    # so IoU = t at d = 10 (1 - t) / (1 + t).
    def shift_for(t):
        return 10.0 * (1 - t) / (1 + t)

    box = np.array([[0, 0, 10, 10]], np.float32)
    for target, above in [(threshold + 1e-3, True), (threshold - 1e-3, False)]:
        d = shift_for(target)
        other = np.array([[0, d, 10, 10 + d]], np.float32)
        value = B.iou(box, other).numpy()[0, 0]
        assert abs(value - target) < 1e-5
        assert (value >= threshold) == above


def test_area_hand_cases():
    boxes = np.array([[0, 0, 2, 3], [1, 1, 2, 2], [5, 5, 4, 9], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(B.area(boxes).numpy(), [6.0, 1.0, 0.0, 0.0])  # inverted box -> 0
    assert B.area(np.zeros((2, 3, 4))).shape == (2, 3)


# ---------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------


def test_encode_hand_case():
    reference = np.array([0, 0, 10, 20], np.float32)  # centre (5, 10), h 10, w 20
    box = np.array([5, 0, 25, 40], np.float32)  # centre (15, 20), h 20, w 40
    expected = [10 / 10, 10 / 20, math.log(2), math.log(2)]
    np.testing.assert_allclose(B.encode(box, reference).numpy(), expected, rtol=1e-6)
    weights = (10.0, 10.0, 5.0, 5.0)
    weighted = B.encode(box, reference, weights).numpy()
    np.testing.assert_allclose(weighted, np.multiply(expected, weights), rtol=1e-6)
    np.testing.assert_array_equal(B.encode(reference, reference).numpy(), [0, 0, 0, 0])


@settings(max_examples=60, deadline=None)
@given(
    box_arrays(min_n=1, min_size=1.0),
    box_arrays(min_n=1, min_size=1.0),
    st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 0.5, 3.0, 0.25)]),
)
def test_decode_inverts_encode(boxes, reference, weights):
    n = min(len(boxes), len(reference))
    boxes, reference = boxes[:n], reference[:n]
    deltas = B.encode(boxes, reference, weights)
    np.testing.assert_allclose(B.decode(deltas, reference, weights).numpy(), boxes, atol=2e-3)


def test_decode_clamps_huge_size_deltas():
    reference = np.array([[0, 0, 16, 16]], np.float32)
    deltas = np.array([[0, 0, 1e6, 1e6]], np.float32)
    box = B.decode(deltas, reference).numpy()[0]
    assert np.all(np.isfinite(box))
    np.testing.assert_allclose(box[2] - box[0], 1000.0, rtol=1e-4)  # 16 * 1000 / 16
    tiny = B.decode(np.array([[0, 0, -1e6, -1e6]], np.float32), reference).numpy()[0]
    assert np.all(np.isfinite(tiny))


# ---------------------------------------------------------------------------
# clip, COCO conversions, boxes of masks
# ---------------------------------------------------------------------------


def test_clip_hand_case():
    boxes = np.array([[-5, 3, 12, 30], [2, 2, 4, 4]], np.float32)
    np.testing.assert_array_equal(B.clip(boxes, 10, 20).numpy(), [[0, 3, 10, 20], [2, 2, 4, 4]])


def test_coco_conversion_hand_case():
    np.testing.assert_array_equal(B.coco_xywh_to_yxyx([[5, 3, 2, 4]]), [[3, 5, 7, 7]])
    np.testing.assert_array_equal(B.yxyx_to_coco_xywh([[3, 5, 7, 7]]), [[5, 3, 2, 4]])
    assert B.coco_xywh_to_yxyx(np.zeros((0, 4))).shape == (0, 4)


@settings(max_examples=40, deadline=None)
@given(box_arrays())
def test_coco_conversions_round_trip(boxes):
    np.testing.assert_allclose(B.coco_xywh_to_yxyx(B.yxyx_to_coco_xywh(boxes)), boxes, atol=1e-4)


def test_boxes_from_masks_hand_cases():
    masks = np.zeros((3, 8, 10), bool)
    masks[0, 3, 5] = True  # one pixel -> height 1, width 1
    masks[1, 1:4, 2] = True  # an L shape: rows 1..3 of column 2, and row 3 up to column 6
    masks[1, 3, 2:7] = True
    # masks[2] stays empty
    boxes = B.boxes_from_masks(masks)
    np.testing.assert_array_equal(boxes, [[3, 5, 4, 6], [1, 2, 4, 7], [0, 0, 0, 0]])
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(B.area(boxes[:1]).numpy(), [1.0])
    assert B.boxes_from_masks(np.zeros((0, 8, 10), bool)).shape == (0, 4)


def test_boxes_from_masks_touching_the_border():
    masks = np.ones((1, 5, 7), bool)
    np.testing.assert_array_equal(B.boxes_from_masks(masks), [[0, 0, 5, 7]])


def test_iou_broadcasts_over_a_batch():
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 50, size=(3, 5, 2, 2))
    a = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1).astype(np.float32)[:, :5]
    b = a[:, ::-1][:, :4] + 3.0
    batched = B.iou(a, b).numpy()  # [3, 5, 4]
    assert batched.shape == (3, 5, 4)
    for i in range(3):
        np.testing.assert_allclose(batched[i], B.iou(a[i], b[i]).numpy(), rtol=1e-6)
    # one set of anchors against a batch of boxes: [1, N, 4] with [B, M, 4] -> [B, N, M]
    np.testing.assert_allclose(B.iou(a[0][None], b).numpy()[2], B.iou(a[0], b[2]).numpy(), rtol=1e-6)
