"""Tests of minimask.anchors: layout against a loop reference, labels against a brute-force
labeller, sampling invariants, regression targets and the coverage diagnostics."""
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask import anchors as A
from minimask.boxes import decode

# ---------------------------------------------------------------------------
# References, written for reading
# ---------------------------------------------------------------------------


def anchors_reference(image_shape, strides, scales, ratios):
    """The documented layout, one anchor at a time: level, y, x, scale, ratio (h / w)."""
    h, w = image_shape
    out = []
    for stride, level_scales in zip(strides, scales):
        for y in range(math.ceil(h / stride)):
            for x in range(math.ceil(w / stride)):
                cy, cx = (y + 0.5) * stride, (x + 0.5) * stride
                for size in level_scales:
                    for ratio in ratios:
                        height, width = size * math.sqrt(ratio), size / math.sqrt(ratio)
                        out.append((cy - height / 2, cx - width / 2, cy + height / 2, cx + width / 2))
    return np.array(out)


def box_area(b):
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def pair_iou(a, b):
    inter = intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def label_reference(anchors, gt, num_gt, ignore=None, num_ignore=None, positive=0.7, negative=0.3,
                    low_quality=True, ignore_threshold=0.5, border=None, image_shape=None):
    """Faster R-CNN labelling with loops. Returns labels, matched, and a mask of anchors whose
    ignore-overlap sits within 1e-5 of the threshold (float rounding may go either way there)."""
    num_images, num_anchors = len(gt), len(anchors)
    labels = np.zeros((num_images, num_anchors), int)
    matched = np.zeros((num_images, num_anchors), int)
    ambiguous = np.zeros((num_images, num_anchors), bool)

    def inside(a):
        if border is None:
            return True
        h, w = image_shape
        return a[0] >= -border and a[1] >= -border and a[2] <= h + border and a[3] <= w + border

    for b in range(num_images):
        boxes = gt[b][: num_gt[b]]
        usable = [inside(a) for a in anchors]
        ious = [[pair_iou(a, g) for g in boxes] for a in anchors]
        best_of_gt = [
            max((ious[i][j] for i in range(num_anchors) if usable[i]), default=0.0) for j in range(len(boxes))
        ]
        for i, a in enumerate(anchors):
            if not usable[i]:
                continue  # neutral
            row = ious[i]
            best = max(row, default=-1.0)
            if row:
                matched[b, i] = row.index(best)
            is_positive = best >= positive
            if low_quality:
                is_positive |= any(best_of_gt[j] > 0 and row[j] == best_of_gt[j] for j in range(len(boxes)))
            if is_positive:
                labels[b, i] = A.OBJECT
                continue
            labels[b, i] = A.NO_OBJECT if best < negative else A.NEUTRAL
            if ignore is not None:
                for g in ignore[b][: num_ignore[b]]:
                    share = intersection(a, g) / box_area(a)
                    if share > ignore_threshold:
                        labels[b, i] = A.NEUTRAL
                    if abs(share - ignore_threshold) < 1e-5:
                        ambiguous[b, i] = True
    return labels, matched, ambiguous


def integer_boxes(rng, n, low=0, high=32, max_size=16):
    corner = rng.integers(low, high, (n, 2))
    size = rng.integers(1, max_size + 1, (n, 2))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_shape,strides,scales,ratios",
    [
        ((64, 96), (8, 16), ((16,), (32,)), (0.5, 1.0, 2.0)),
        ((70, 50), (16, 32), ((20, 28), (40, 56)), (1.0, 3.0)),  # sizes not multiples of the strides
        ((128, 128), A.DEFAULT_STRIDES, A.DEFAULT_SCALES, A.DEFAULT_RATIOS),
    ],
)
def test_anchors_match_the_loop_reference(image_shape, strides, scales, ratios):
    anchors = A.generate_anchors(image_shape, strides, scales, ratios)
    assert anchors.dtype == np.float32
    np.testing.assert_allclose(anchors, anchors_reference(image_shape, strides, scales, ratios), atol=1e-4)
    counts = A.anchors_per_level(image_shape, strides, scales, ratios)
    assert sum(counts) == len(anchors)
    k = A.num_anchors_per_location(scales, ratios)
    assert counts == tuple(math.ceil(image_shape[0] / s) * math.ceil(image_shape[1] / s) * k for s in strides)


def test_ratio_is_height_over_width_and_keeps_the_area():
    anchors = A.generate_anchors((32, 32), strides=(32,), scales=((16,),), ratios=(2.0, 0.25))
    heights = anchors[:, 2] - anchors[:, 0]
    widths = anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose(heights / widths, [2.0, 0.25], rtol=1e-6)  # ratio 2: twice as tall as wide
    np.testing.assert_allclose(heights * widths, [256.0, 256.0], rtol=1e-6)
    np.testing.assert_allclose(heights, [16 * math.sqrt(2), 8.0], rtol=1e-6)


def test_anchor_index_of_position_and_shape():
    # Level 2 (stride 16) of a 64 x 48 image: feature map 4 x 3, k = 2 scales x 3 ratios, scale-major.
    strides, scales, ratios = (8, 16), ((8, 12), (16, 24)), (0.5, 1.0, 2.0)
    anchors = A.generate_anchors((64, 48), strides, scales, ratios)
    offset = A.anchors_per_level((64, 48), strides, scales, ratios)[0]
    y, x, scale_index, ratio_index = 2, 1, 1, 2
    index = offset + (y * 3 + x) * 6 + scale_index * 3 + ratio_index
    y1, x1, y2, x2 = anchors[index]
    np.testing.assert_allclose([(y1 + y2) / 2, (x1 + x2) / 2], [(y + 0.5) * 16, (x + 0.5) * 16])
    ratio, size = (y2 - y1) / (x2 - x1), math.sqrt((y2 - y1) * (x2 - x1))
    np.testing.assert_allclose([ratio, size], [2.0, 24.0], rtol=1e-6)


def test_anchors_are_cached_and_read_only():
    a = A.generate_anchors((64, 64), (8,), ((16,),))
    assert A.generate_anchors((64, 64), [8], [[16]]) is a  # lists normalise to the same cache key
    assert A.generate_anchors((64, 64), (8,), (16,)) is a  # one bare number per level
    with pytest.raises(ValueError):
        a[0, 0] = 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image_shape=(64,)), "image_shape"),
        (dict(image_shape=(64, 0)), "image_shape"),
        (dict(strides=(8, 16), scales=((16,),)), "one group of scales per level"),
        (dict(strides=(8, 16), scales=((16,), (32, 48))), "same number of scales"),
        (dict(ratios=(1.0, -2.0)), "ratios"),
        (dict(scales=((0,),)), "positive"),
        (dict(strides=(0,)), "strides"),
    ],
)
def test_bad_anchor_configurations_raise(kwargs, message):
    config = dict(image_shape=(64, 64), strides=(8,), scales=((16,),), ratios=(1.0,))
    config.update(kwargs)
    with pytest.raises(ValueError, match=message):
        A.generate_anchors(**config)


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    low_quality=st.booleans(),
    border=st.sampled_from([None, 0.0, 3.0]),
    with_ignore=st.booleans(),
)
def test_labels_match_the_brute_force_labeller(seed, low_quality, border, with_ignore):
    rng = np.random.default_rng(seed)
    anchors = integer_boxes(rng, 40, low=-4, high=36)
    gt = integer_boxes(rng, 2 * 3).reshape(2, 3, 4)
    # Some objects sit on an anchor, nearly: high IoUs and exact ties happen.
    gt[0, 0] = anchors[rng.integers(40)] + rng.integers(-1, 2, 4)
    gt[0, 0, 2:] = np.maximum(gt[0, 0, 2:], gt[0, 0, :2] + 1)
    num_gt = rng.integers(0, 4, 2)
    gt[np.arange(3)[None, :] >= num_gt[:, None]] = anchors[0]  # padding rows that would match well
    ignore = integer_boxes(rng, 2 * 2, max_size=30).reshape(2, 2, 4) if with_ignore else None
    num_ignore = rng.integers(0, 3, 2) if with_ignore else None

    labels, matched = A.label_anchors(
        anchors, gt, num_gt, ignore, num_ignore,
        allow_low_quality_matches=low_quality, border=border, image_shape=(32, 32),
    )
    expected, expected_matched, ambiguous = label_reference(
        anchors, gt, num_gt, ignore, num_ignore, low_quality=low_quality, border=border, image_shape=(32, 32)
    )
    labels, matched = labels.numpy(), matched.numpy()
    assert labels.dtype == np.int32 and matched.dtype == np.int32
    np.testing.assert_array_equal(labels[~ambiguous], expected[~ambiguous])
    positive = labels == A.OBJECT
    np.testing.assert_array_equal(matched[positive], expected_matched[positive])
    assert np.all(matched[num_gt == 0] == 0)


def test_low_quality_matches_include_ties():
    # A 4 x 8 box centred between two 8 x 8 anchors: both have IoU 4*4 / (64 + 32 - 16) = 0.2.
    anchors = np.array([[0, 0, 8, 8], [0, 8, 8, 16], [20, 20, 28, 28]], np.float32)
    gt = np.array([[[2, 4, 6, 12]]], np.float32)
    labels, matched = A.label_anchors(anchors, gt, [1])
    np.testing.assert_array_equal(labels.numpy(), [[A.OBJECT, A.OBJECT, A.NO_OBJECT]])
    np.testing.assert_array_equal(matched.numpy()[0, :2], [0, 0])
    labels, _ = A.label_anchors(anchors, gt, [1], allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels.numpy(), [[A.NO_OBJECT, A.NO_OBJECT, A.NO_OBJECT]])


def test_labels_around_the_thresholds():
    # Anchor 10 x 10; objects shifted right by d have IoU (10 - d) / (10 + d).
    def shifted(t):
        d = 10.0 * (1 - t) / (1 + t)
        return [0, d, 10, 10 + d]

    anchors = np.array([[0, 0, 10, 10]] * 4, np.float32) + np.arange(4, dtype=np.float32)[:, None] * 100
    gt = np.array([[shifted(0.701), shifted(0.699), shifted(0.301), shifted(0.299)]], np.float32)
    gt += (np.arange(4, dtype=np.float32)[:, None] * 100)[None]
    labels, matched = A.label_anchors(anchors, gt, [4], allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels.numpy(), [[A.OBJECT, A.NEUTRAL, A.NEUTRAL, A.NO_OBJECT]])
    np.testing.assert_array_equal(matched.numpy(), [[0, 1, 2, 3]])
    # Exactly at the thresholds (IoU 70 / 100 and 30 / 100): ">= 0.7" is positive, "< 0.3" is not met.
    gt = np.array([[[0, 0, 10, 7], [100, 100, 110, 103]]], np.float32)
    labels, _ = A.label_anchors(anchors[:2], gt, [2], allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels.numpy(), [[A.OBJECT, A.NEUTRAL]])


def test_images_without_objects_are_all_negative():
    anchors = A.generate_anchors((32, 32), (8,), ((16,),))
    garbage = np.full((2, 3, 4), np.nan, np.float32)  # padding rows carry no meaning, even NaN
    for gt in (garbage, np.zeros((2, 0, 4), np.float32)):
        labels, matched = A.label_anchors(anchors, gt, [0, 0])
        assert np.all(labels.numpy() == A.NO_OBJECT)
        assert np.all(matched.numpy() == 0)
        targets = A.rpn_targets(anchors, gt, matched, labels)
        assert np.all(targets.numpy() == 0.0)


def test_ignore_regions_make_non_positive_anchors_neutral():
    anchors = np.array(
        [[0, 0, 4, 4], [0, 0, 8, 8], [2, 2, 6, 6], [30, 30, 34, 34], [40, 40, 50, 50]], np.float32
    )
    gt = np.array([[[0, 0, 4, 4]]], np.float32)  # anchor 0 matches it exactly
    crowd = np.array([[[0, 0, 16, 5], [99, 99, 100, 100]]], np.float32)
    labels, _ = A.label_anchors(anchors, gt, [1], crowd, [1])
    # 0: positive stays positive; 1: 40 / 64 inside (> 0.5) -> neutral; 2: 12 / 16 -> neutral;
    # 3, 4: outside the crowd -> negative.  The second ignore row is padding.
    expected = [[A.OBJECT, A.NEUTRAL, A.NEUTRAL, A.NO_OBJECT, A.NO_OBJECT]]
    np.testing.assert_array_equal(labels.numpy(), expected)
    labels, _ = A.label_anchors(anchors, gt, [1], crowd, [0])
    np.testing.assert_array_equal(labels.numpy()[0, 1:3], [A.NO_OBJECT, A.NO_OBJECT])


def test_border_option_neutralises_anchors_that_cross_the_image():
    anchors = np.array([[-2, 0, 8, 8], [0, 0, 8, 8], [24, 24, 33, 32]], np.float32)
    gt = np.array([[[-2, 0, 8, 8]]], np.float32)
    labels, _ = A.label_anchors(anchors, gt, [1])
    assert labels.numpy()[0, 0] == A.OBJECT  # default: every anchor kept
    labels, _ = A.label_anchors(anchors, gt, [1], border=0.0, image_shape=(32, 32))
    # Anchor 0 crosses the top, anchor 2 the bottom; anchor 1 becomes the best inside match.
    np.testing.assert_array_equal(labels.numpy(), [[A.NEUTRAL, A.OBJECT, A.NEUTRAL]])
    labels, _ = A.label_anchors(anchors, gt, [1], border=2.0, image_shape=(32, 32))
    np.testing.assert_array_equal(labels.numpy()[0, [0, 2]], [A.OBJECT, A.NO_OBJECT])


def test_label_argument_errors():
    anchors = np.zeros((3, 4), np.float32)
    gt = np.zeros((1, 1, 4), np.float32)
    with pytest.raises(ValueError, match="negative_threshold"):
        A.label_anchors(anchors, gt, [1], positive_threshold=0.3, negative_threshold=0.7)
    with pytest.raises(ValueError, match="num_ignore"):
        A.label_anchors(anchors, gt, [1], ignore_boxes=gt)
    with pytest.raises(ValueError, match="image_shape"):
        A.label_anchors(anchors, gt, [1], border=0.0)
    with pytest.raises(ValueError, match="padded batch"):
        A.label_anchors(anchors, gt[0], [1])


# ---------------------------------------------------------------------------
# Sampling and targets
# ---------------------------------------------------------------------------


def random_labels(rng, batch, num_anchors, positive_share):
    draw = rng.random((batch, num_anchors))
    labels = np.where(draw < positive_share, A.OBJECT, np.where(draw < 0.8, A.NO_OBJECT, A.NEUTRAL))
    return labels.astype(np.int32)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    positive_share=st.sampled_from([0.0, 0.01, 0.3]),
    num_samples=st.sampled_from([0, 16, 64, 1000]),
    fraction=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_sampling_keeps_the_right_numbers_of_each_kind(seed, positive_share, num_samples, fraction):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, 3, 300, positive_share)
    sampled = A.sample_anchors(labels, num_samples, fraction, seed=seed).numpy()
    kept = sampled != A.NEUTRAL
    np.testing.assert_array_equal(sampled[kept], labels[kept])  # a subset, labels unchanged
    for image, original in zip(sampled, labels):
        positives, negatives = (original == A.OBJECT).sum(), (original == A.NO_OBJECT).sum()
        expected_positives = min(positives, int(num_samples * fraction))
        assert (image == A.OBJECT).sum() == expected_positives
        assert (image == A.NO_OBJECT).sum() == min(negatives, num_samples - expected_positives)


def test_sampling_is_deterministic_and_depends_on_the_seed():
    labels = random_labels(np.random.default_rng(0), 2, 500, 0.4)
    first = A.sample_anchors(labels, 64, seed=7).numpy()
    np.testing.assert_array_equal(first, A.sample_anchors(labels, 64, seed=7).numpy())
    assert not np.array_equal(first, A.sample_anchors(labels, 64, seed=8).numpy())
    # A seed tensor inside tf.function gives the same as the int seed [7, 0].
    traced = tf.function(lambda l, s: A.sample_anchors(l, 64, seed=s))
    np.testing.assert_array_equal(first, traced(labels, tf.constant([7, 0], tf.int64)).numpy())


def test_sampling_picks_anchors_uniformly():
    # 20 positives, 10 are kept each time: over 400 seeds each is kept about half of the time.
    labels = np.full((1, 40), A.NO_OBJECT, np.int32)
    labels[0, :20] = A.OBJECT
    counts = sum((A.sample_anchors(labels, 20, 0.5, seed=s).numpy()[0, :20] == A.OBJECT) for s in range(400))
    assert np.all(np.abs(counts / 400 - 0.5) < 0.1)


def test_rpn_targets_decode_back_to_the_matched_boxes():
    rng = np.random.default_rng(3)
    anchors = A.generate_anchors((64, 64), (8, 16), ((16,), (32,)))
    gt = integer_boxes(rng, 2 * 4, high=48, max_size=24).reshape(2, 4, 4)
    num_gt = np.array([4, 2])
    labels, matched = A.label_anchors(anchors, gt, num_gt)
    weights = (10.0, 10.0, 5.0, 5.0)
    targets = A.rpn_targets(anchors, gt, matched, labels, weights).numpy()
    positive = labels.numpy() == A.OBJECT
    assert positive.sum() >= 6  # every object has at least one positive anchor
    decoded = decode(targets, np.broadcast_to(anchors, targets.shape), weights).numpy()
    expected = np.take_along_axis(gt, matched.numpy()[..., None], axis=1)
    np.testing.assert_allclose(decoded[positive], expected[positive], atol=1e-3)
    assert np.all(targets[~positive] == 0.0)


def test_labelling_runs_traced_with_static_shapes():
    anchors = A.generate_anchors((64, 64), (8, 16), ((16,), (32,)))

    @tf.function(input_signature=[tf.TensorSpec([2, 5, 4]), tf.TensorSpec([2], tf.int32)])
    def targets(gt, num_gt):
        labels, matched = A.label_anchors(anchors, gt, num_gt)
        labels = A.sample_anchors(labels, 32, seed=1)
        return labels, A.rpn_targets(anchors, gt, matched, labels)

    gt = integer_boxes(np.random.default_rng(1), 10, high=48, max_size=24).reshape(2, 5, 4)
    labels, deltas = targets(gt, np.array([5, 0], np.int32))
    assert labels.shape == (2, len(anchors)) and deltas.shape == (2, len(anchors), 4)
    eager_labels, eager_matched = A.label_anchors(anchors, gt, [5, 0])
    eager_labels = A.sample_anchors(eager_labels, 32, seed=1)
    np.testing.assert_array_equal(labels.numpy(), eager_labels.numpy())
    assert np.all(labels.numpy()[1] != A.OBJECT)


# ---------------------------------------------------------------------------
# Coverage diagnostics
# ---------------------------------------------------------------------------


def test_anchor_coverage_on_hand_made_boxes():
    config = dict(image_shape=(64, 64), strides=(8, 16), scales=((16,), (32,)), ratios=(1.0,))
    boxes = np.array(
        [
            [4, 4, 20, 20],  # exactly the stride-8 anchor of cell (1, 1): IoU 1
            [2, 2, 6, 6],  # 4 x 4: at most 16 / 256 with a 16 x 16 anchor
            [0, 0, 40, 40],  # 40 x 40
        ],
        np.float32,
    )
    report = A.anchor_coverage([boxes[:2], boxes[2:]], positive_threshold=0.7, **config)
    anchors = A.generate_anchors(**config)
    expected = [max(pair_iou(a, b) for a in anchors) for b in boxes]
    np.testing.assert_allclose(report["best_iou"], expected, atol=1e-6)
    assert report["best_iou"][0] == pytest.approx(1.0)
    assert report["best_iou"][1] == pytest.approx(16 / 256)
    assert report["uncovered_share"] == pytest.approx(np.mean(np.array(expected) < 0.7))
    small, medium, large = report["buckets"]
    assert (small["count"], medium["count"], large["count"]) == (2, 1, 0)
    assert small["uncovered_share"] == pytest.approx(0.5)
    assert large["uncovered_share"] is None and large["mean_best_iou"] is None
    with pytest.raises(ValueError, match="at least one"):
        A.anchor_coverage(np.zeros((0, 4)), **config)


def test_suggest_scales_follows_the_data_and_improves_coverage():
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 40, (50, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + 20], axis=1)  # 20 x 20 objects, smaller than any anchor
    config = dict(image_shape=(64, 64), strides=(4, 8, 16), ratios=(1.0,))
    before = A.anchor_coverage(boxes, scales=((32,), (64,), (128,)), **config)
    assert before["uncovered_share"] == 1.0  # best possible IoU 400 / 1024
    scales = A.suggest_scales(boxes, strides=(4, 8, 16))
    assert scales == ((20.0,), (64.0,), (128.0,))  # all boxes go to the finest level; others keep FPN's
    after = A.anchor_coverage(boxes, scales=scales, **config)
    assert after["uncovered_share"] < 0.5


def test_suggest_scales_hand_quantiles():
    sizes = np.array([10, 20, 30, 40, 200], np.float32)
    boxes = np.stack([np.zeros(5), np.zeros(5), sizes, sizes], axis=1)
    # Levels of strides 4 / 8: sizes below sqrt(32 * 64) = 45.25 go to stride 4, the rest to 8.
    scales = A.suggest_scales(boxes, strides=(4, 8, 16), scales_per_level=2)
    assert scales[0] == (17.5, 32.5)  # quantiles 0.25 and 0.75 of 10, 20, 30, 40
    assert scales[1] == (64.0, 90.5)  # no box: FPN ladder 64 * 2**(j / 2)
    assert scales[2] == (200.0, 200.0)
