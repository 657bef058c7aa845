"""Tests of minimask.proposals: NMS against TensorFlow's kernel and a greedy numpy loop, the
padded batched NMS, and the proposal pipeline against a numpy reference."""
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask import anchors as A
from minimask import proposals as P

# ---------------------------------------------------------------------------
# References, written for reading
# ---------------------------------------------------------------------------


def pair_iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_reference(boxes, scores, iou_threshold, max_output_size, valid=None):
    """Greedy NMS: take the best remaining box, drop the boxes that overlap it too much, repeat."""
    candidates = [i for i in np.argsort(-scores, kind="stable") if scores[i] > -np.inf]
    if valid is not None:
        candidates = [i for i in candidates if valid[i]]
    kept = []
    while candidates and len(kept) < max_output_size:
        best = candidates.pop(0)
        kept.append(int(best))
        candidates = [i for i in candidates if pair_iou(boxes[best], boxes[i]) <= iou_threshold]
    return kept


def decode_reference(delta, anchor, weights, clamp=math.log(1000 / 16)):
    """One box, Faster R-CNN Eqn. 2 inverted."""
    height, width = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cy, cx = anchor[0] + height / 2, anchor[1] + width / 2
    cy += delta[0] / weights[0] * height
    cx += delta[1] / weights[1] * width
    height *= math.exp(min(delta[2] / weights[2], clamp))
    width *= math.exp(min(delta[3] / weights[3], clamp))
    return [cy - height / 2, cx - width / 2, cy + height / 2, cx + width / 2]


def propose_reference(objectness, deltas, anchors, image_shape, pre_n, post_n, threshold, min_size, weights,
                      per_level):
    """The proposal steps one image at a time; returns a list of (boxes [n, 4], scores [n])."""
    h, w = image_shape
    results = []
    for scores, image_deltas in zip(objectness, deltas):
        candidates, offset = [], 0
        for count in per_level or [len(scores)]:
            order = np.argsort(-scores[offset : offset + count], kind="stable")[:pre_n]
            candidates.extend(offset + order)
            offset += count
        boxes, kept_scores = [], []
        for i in candidates:
            y1, x1, y2, x2 = decode_reference(image_deltas[i], anchors[i], weights)
            y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
            x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
            if y2 - y1 > min_size and x2 - x1 > min_size:
                boxes.append([y1, x1, y2, x2])
                kept_scores.append(scores[i])
        boxes, kept_scores = np.array(boxes).reshape(-1, 4), np.array(kept_scores)
        keep = nms_reference(boxes, kept_scores, threshold, post_n)
        results.append((boxes[keep], kept_scores[keep]))
    return results


def random_boxes(rng, n, extent=60.0, clustered=True):
    """Boxes [n, 4] around a few centres, so that many overlap."""
    centres = rng.uniform(0, extent, (max(1, n // 8), 2))
    if clustered:
        centre = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 3, (n, 2))
    else:
        centre = rng.uniform(0, extent, (n, 2))
    size = rng.uniform(2, 20, (n, 2))
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# nms
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 60),
    iou_threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95]),
    max_output_size=st.integers(0, 70),
)
def test_nms_matches_tensorflow_and_the_greedy_loop(seed, n, iou_threshold, max_output_size):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1)  # distinct scores
    got = P.nms(boxes, scores, iou_threshold, max_output_size).numpy()
    assert got.dtype == np.int32
    expected = tf.image.non_max_suppression(boxes, scores, max_output_size, iou_threshold).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, nms_reference(boxes, scores, iou_threshold, max_output_size))


def test_nms_suppresses_only_above_the_threshold():
    boxes = np.array([[0, 0, 1, 2], [0, 0, 1, 1], [5, 5, 6, 6]], np.float32)  # IoU(0, 1) = 1 / 2 exactly
    scores = np.array([0.9, 0.8, 0.1], np.float32)
    np.testing.assert_array_equal(P.nms(boxes, scores, 0.5).numpy(), [0, 1, 2])
    np.testing.assert_array_equal(P.nms(boxes, scores, 0.49).numpy(), [0, 2])
    np.testing.assert_array_equal(P.nms(boxes, scores, 0.49, max_output_size=1).numpy(), [0])


def test_nms_edge_cases():
    assert P.nms(np.zeros((0, 4)), np.zeros((0,)), 0.5).shape == (0,)
    boxes = random_boxes(np.random.default_rng(0), 5, clustered=False)
    # -inf scores are never kept, as in tf.image.non_max_suppression
    assert P.nms(boxes, np.full(5, -np.inf, np.float32), 0.5).shape == (0,)
    scores = np.array([0.1, -np.inf, 0.3, np.nan, 0.2], np.float32)
    kept = P.nms(boxes, scores, 1.0).numpy()
    np.testing.assert_array_equal(kept, [2, 4, 0])
    with pytest.raises(ValueError, match="max_output_size"):
        P.nms(boxes, scores, 0.5, max_output_size=-1)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        P.nms(boxes[None], scores, 0.5, 3)


def test_nms_traced_with_unknown_length():
    traced = tf.function(
        lambda b, s: P.nms(b, s, 0.5, 10), input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None])]
    )
    rng = np.random.default_rng(1)
    for n in (0, 7, 40):
        boxes, scores = random_boxes(rng, n), rng.random(n).astype(np.float32)
        np.testing.assert_array_equal(traced(boxes, scores).numpy(), nms_reference(boxes, scores, 0.5, 10))


# ---------------------------------------------------------------------------
# nms_padded
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_builtin", [True, False])
@pytest.mark.parametrize("valid_as", ["mask", "count", "none"])
def test_nms_padded_matches_per_image_nms(use_builtin, valid_as):
    rng = np.random.default_rng(2)
    boxes = np.stack([random_boxes(rng, 50) for _ in range(3)])
    scores = rng.normal(size=(3, 50)).astype(np.float32)  # logits: negative ones too
    scores[2, 5:] = -np.inf  # an image where few survive
    counts = np.array([50, 20, 0])
    mask = rng.random((3, 50)) < 0.7
    valid = {"mask": mask, "count": counts, "none": None}[valid_as]
    result = P.nms_padded(boxes, scores, valid, iou_threshold=0.4, max_output_size=12,
                          use_builtin=use_builtin)
    assert result.indices.shape == (3, 12) and result.boxes.shape == (3, 12, 4)
    assert result.scores.shape == (3, 12)
    for b in range(3):
        image_valid = {"mask": mask[b], "count": np.arange(50) < counts[b], "none": None}[valid_as]
        expected = nms_reference(boxes[b], scores[b], 0.4, 12, image_valid)
        n = int(result.num_kept[b])
        assert n == len(expected)
        np.testing.assert_array_equal(result.indices[b, :n], expected)
        np.testing.assert_array_equal(result.boxes[b, :n], boxes[b, expected])
        np.testing.assert_array_equal(result.scores[b, :n], scores[b, expected])
        assert np.all(result.indices[b, n:] == 0) and np.all(result.boxes[b, n:] == 0)


def test_nms_padded_with_nothing_to_keep():
    result = P.nms_padded(np.zeros((2, 0, 4)), np.zeros((2, 0)), None, 0.5, 4)
    assert result.indices.shape == (2, 4) and np.all(result.num_kept.numpy() == 0)
    result = P.nms_padded(np.zeros((2, 3, 4)), np.zeros((2, 3)), np.zeros((2,), np.int32), 0.5, 4)
    assert np.all(result.num_kept.numpy() == 0) and np.all(result.boxes.numpy() == 0)


# ---------------------------------------------------------------------------
# propose / ProposalLayer
# ---------------------------------------------------------------------------

STRIDES, SCALES, RATIOS = (8, 16), ((16,), (32,)), (0.5, 1.0, 2.0)
IMAGE = (48, 64)


def rpn_outputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    anchors = A.generate_anchors(IMAGE, STRIDES, SCALES, RATIOS)
    objectness = rng.normal(size=(batch, len(anchors))).astype(np.float32)
    deltas = rng.normal(scale=0.3, size=(batch, len(anchors), 4)).astype(np.float32)
    return objectness, deltas, anchors


@pytest.mark.parametrize("per_level", [True, False])
@pytest.mark.parametrize("min_size", [0.0, 12.0])
def test_propose_matches_the_numpy_pipeline(per_level, min_size):
    objectness, deltas, anchors = rpn_outputs(seed=4)
    counts = A.anchors_per_level(IMAGE, STRIDES, SCALES, RATIOS) if per_level else None
    weights = (10.0, 10.0, 5.0, 5.0)
    boxes, scores, num = P.propose(
        objectness, deltas, anchors, IMAGE, pre_nms_top_n=60, post_nms_top_n=25, nms_threshold=0.6,
        min_size=min_size, weights=weights, anchors_per_level=counts,
    )
    assert boxes.shape == (2, 25, 4) and scores.shape == (2, 25) and num.shape == (2,)
    expected = propose_reference(objectness, deltas, anchors, IMAGE, 60, 25, 0.6, min_size, weights, counts)
    for b, (expected_boxes, expected_scores) in enumerate(expected):
        n = int(num[b])
        assert n == len(expected_boxes)
        np.testing.assert_allclose(boxes[b, :n], expected_boxes, atol=1e-3)
        np.testing.assert_array_equal(scores[b, :n], expected_scores)
        assert np.all(boxes.numpy()[b, n:] == 0) and np.all(scores.numpy()[b, n:] == 0)


def test_propose_per_level_keeps_coarse_levels():
    # Scores favour every fine-level anchor; counted overall, no coarse-level anchor would survive.
    objectness, deltas, anchors = rpn_outputs(seed=5, batch=1)
    deltas[:] = 0.0
    fine, coarse = A.anchors_per_level(IMAGE, STRIDES, SCALES, RATIOS)
    objectness[0, :fine] += 100.0
    coarse_sizes = {32.0}
    for counts, expect_coarse in [(None, False), ((fine, coarse), True)]:
        boxes, _, num = P.propose(objectness, deltas, anchors, (1000, 1000), 20, 200, nms_threshold=1.0,
                                  anchors_per_level=counts)
        kept = boxes.numpy()[0, : int(num[0])]
        sizes = np.round(np.sqrt((kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])))
        assert bool(coarse_sizes & set(sizes)) == expect_coarse


def test_propose_with_nothing_valid_gives_zero_proposals():
    objectness, deltas, anchors = rpn_outputs(seed=6)
    objectness[:] = -np.inf
    boxes, scores, num = P.propose(objectness, deltas, anchors, IMAGE, 50, 10)
    assert np.all(num.numpy() == 0) and np.all(boxes.numpy() == 0) and np.all(np.isfinite(scores.numpy()))
    objectness, deltas, anchors = rpn_outputs(seed=6)
    deltas[..., 0] = 50.0  # every box moved far below the image: empty after clipping
    _, _, num = P.propose(objectness, deltas, anchors, IMAGE, 50, 10)
    assert np.all(num.numpy() == 0)


def test_propose_argument_errors():
    objectness, deltas, anchors = rpn_outputs(seed=0)
    with pytest.raises(ValueError, match="anchors"):
        P.propose(objectness, deltas, anchors[:-1], IMAGE)
    with pytest.raises(ValueError, match="add up"):
        P.propose(objectness, deltas, anchors, IMAGE, anchors_per_level=(3, 4))


def test_proposal_layer_sizes_config_and_tracing():
    objectness, deltas, anchors = rpn_outputs(seed=7)
    layer = P.ProposalLayer(pre_nms_top_n_train=80, post_nms_top_n_train=30, pre_nms_top_n_inference=40,
                            post_nms_top_n_inference=12, nms_threshold=0.6, delta_weights=(10, 10, 5, 5))
    counts = A.anchors_per_level(IMAGE, STRIDES, SCALES, RATIOS)
    training = layer(objectness, deltas, anchors, image_shape=IMAGE, anchors_per_level=counts, training=True)
    inference = layer(objectness, deltas, anchors, image_shape=IMAGE, anchors_per_level=counts)
    assert training[0].shape == (2, 30, 4) and inference[0].shape == (2, 12, 4)
    direct = P.propose(objectness, deltas, anchors, IMAGE, 40, 12, 0.6, weights=(10, 10, 5, 5),
                       anchors_per_level=counts)
    for got, want in zip(inference, direct):
        np.testing.assert_array_equal(got.numpy(), want.numpy())

    clone = P.ProposalLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    traced = tf.function(lambda o, d: clone(o, d, anchors, image_shape=IMAGE, anchors_per_level=counts))
    for got, want in zip(traced(objectness, deltas), direct):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
