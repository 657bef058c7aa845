"""Tests of minimask.rpn: output order against the anchor layout, losses against a numpy
reference, initial loss, empty images, gradients, serialisation and tracing."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from minimask import anchors as A
from minimask import rpn

STRIDES, SCALES, RATIOS = (8, 16), ((16, 24), (32, 48)), (0.5, 1.0, 2.0)  # k = 6 anchors per position
IMAGE = (48, 64)


def pyramid(batch=2, channels=5, seed=0):
    """Random feature maps with the shapes the anchors expect: [B, 6, 8, C] and [B, 3, 4, C]."""
    rng = np.random.default_rng(seed)
    shapes = A.feature_shapes(IMAGE, STRIDES)
    return [rng.normal(size=(batch, h, w, channels)).astype(np.float32) for h, w in shapes]


# ---------------------------------------------------------------------------
# References, written for reading
# ---------------------------------------------------------------------------


def bce_reference(logit, target):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def smooth_l1_reference(x, beta):
    x = abs(x)
    if beta > 0 and x < beta:
        return 0.5 * x * x / beta
    return x - 0.5 * beta


def losses_reference(objectness, deltas, labels, targets, beta):
    class_sum, box_sum, sampled = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for a in range(labels.shape[1]):
            if labels[b, a] == A.NEUTRAL:
                continue
            sampled += 1
            class_sum += bce_reference(float(objectness[b, a]), 1.0 if labels[b, a] == A.OBJECT else 0.0)
            if labels[b, a] == A.OBJECT:
                for d, t in zip(deltas[b, a], targets[b, a]):
                    box_sum += smooth_l1_reference(float(d - t), beta)
    if sampled == 0:
        return 0.0, 0.0
    return class_sum / sampled, box_sum / sampled


# ---------------------------------------------------------------------------
# Head
# ---------------------------------------------------------------------------


def test_head_outputs_follow_the_anchor_order():
    head = rpn.RPNHead(num_anchors=6, channels=8, init_stddev=0.5, seed=0)
    features = pyramid()
    logits, deltas = head(features)
    anchors = A.generate_anchors(IMAGE, STRIDES, SCALES, RATIOS)
    assert logits.shape == (2, len(anchors)) and deltas.shape == (2, len(anchors), 4)

    level, y, x, a, b = 1, 2, 3, 4, 1  # stride 16, row 2, column 3, scale 48 at ratio 1.0
    hidden = head.conv(features[level])
    per_position_logits = head.objectness(hidden).numpy()  # [B, H, W, k]
    per_position_deltas = head.deltas(hidden).numpy()  # [B, H, W, 4k]
    height, width = A.feature_shapes(IMAGE, STRIDES)[level]
    index = A.anchors_per_level(IMAGE, STRIDES, SCALES, RATIOS)[0] + (y * width + x) * 6 + a
    assert logits.numpy()[b, index] == pytest.approx(per_position_logits[b, y, x, a], abs=1e-6)
    expected_deltas = per_position_deltas[b, y, x, 4 * a : 4 * a + 4]
    np.testing.assert_allclose(deltas.numpy()[b, index], expected_deltas, atol=1e-6)
    # ... and the anchor at that index is the one of that position and shape.
    y1, x1, y2, x2 = anchors[index]
    np.testing.assert_allclose([(y1 + y2) / 2, (x1 + x2) / 2], [(y + 0.5) * 16, (x + 0.5) * 16])
    np.testing.assert_allclose([y2 - y1, x2 - x1], [48, 48], rtol=1e-6)


def test_head_is_shared_over_levels_and_has_the_documented_weights():
    head = rpn.RPNHead(num_anchors=3, channels=8)
    head(pyramid())
    shapes = sorted(tuple(w.shape) for w in head.weights)
    assert shapes == sorted([(3, 3, 5, 8), (8,), (1, 1, 8, 3), (3,), (1, 1, 8, 12), (12,)])


def test_same_seed_same_head():
    features = pyramid()
    first = rpn.RPNHead(num_anchors=6, channels=8, seed=3)(features)[0].numpy()
    again = rpn.RPNHead(num_anchors=6, channels=8, seed=3)(features)[0].numpy()
    np.testing.assert_array_equal(first, again)


def test_head_round_trips_through_keras_saving(tmp_path):
    features = pyramid(batch=1)
    inputs = [keras.Input(f.shape[1:]) for f in features]
    model = keras.Model(inputs, rpn.RPNHead(num_anchors=6, channels=8, init_stddev=0.3, seed=1)(inputs))
    model.save(tmp_path / "rpn.keras")
    loaded = keras.models.load_model(tmp_path / "rpn.keras")
    for got, want in zip(loaded(features), model(features)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    config = model.layers[-1].get_config()
    assert (config["num_anchors"], config["channels"], config["init_stddev"]) == (6, 8, 0.3)


def test_head_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_anchors"):
        rpn.RPNHead(num_anchors=0)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1 / 9, 0.0, 1.0])
def test_losses_match_the_numpy_reference(beta):
    rng = np.random.default_rng(5)
    objectness = rng.normal(scale=3, size=(2, 30)).astype(np.float32)
    deltas = rng.normal(scale=0.5, size=(2, 30, 4)).astype(np.float32)
    targets = rng.normal(scale=0.5, size=(2, 30, 4)).astype(np.float32)
    labels = rng.choice([A.OBJECT, A.NO_OBJECT, A.NEUTRAL], size=(2, 30)).astype(np.int32)
    class_loss, box_loss = rpn.rpn_losses(objectness, deltas, labels, targets, beta=beta)
    expected_class, expected_box = losses_reference(objectness, deltas, labels, targets, beta)
    assert float(class_loss) == pytest.approx(expected_class, rel=1e-5)
    assert float(box_loss) == pytest.approx(expected_box, rel=1e-5)


def test_smooth_l1_hand_values():
    got = rpn.smooth_l1(np.array([0.0, 0.05, -0.5, 2.0]), beta=0.1).numpy()
    np.testing.assert_allclose(got, [0.0, 0.5 * 0.0025 / 0.1, 0.45, 1.95], rtol=1e-6)
    np.testing.assert_allclose(rpn.smooth_l1(np.array([-0.5, 2.0]), beta=0.0).numpy(), [0.5, 2.0])


def test_initial_classification_loss_is_ln2():
    keras.utils.set_random_seed(0)
    head = rpn.RPNHead(num_anchors=6, channels=32)
    logits, deltas = head(pyramid(channels=16))
    coin = np.random.default_rng(0).random(logits.shape) < 0.5
    labels = np.where(coin, A.OBJECT, A.NO_OBJECT).astype(np.int32)
    class_loss, _ = rpn.rpn_losses(logits, deltas, labels, np.zeros(deltas.shape, np.float32))
    assert float(class_loss) == pytest.approx(math.log(2), abs=5e-3)


def test_images_without_objects_give_finite_losses_and_gradients():
    head = rpn.RPNHead(num_anchors=6, channels=8, seed=0)
    features = [tf.constant(f) for f in pyramid()]
    anchors = A.generate_anchors(IMAGE, STRIDES, SCALES, RATIOS)
    gt = np.zeros((2, 0, 4), np.float32)
    labels, matched = A.label_anchors(anchors, gt, [0, 0])
    for sampled in (A.sample_anchors(labels, 16, seed=0), tf.zeros_like(labels)):  # negatives only; nothing
        targets = A.rpn_targets(anchors, gt, matched, sampled)
        with tf.GradientTape() as tape:
            class_loss, box_loss = rpn.rpn_losses(*head(features), sampled, targets)
            total = class_loss + box_loss
        assert float(box_loss) == 0.0
        assert np.isfinite(float(class_loss)) and (float(class_loss) > 0) == bool(np.any(sampled.numpy()))
        for gradient in tape.gradient(total, head.trainable_variables):
            assert np.all(np.isfinite(gradient.numpy()))


@pytest.mark.parametrize("beta", [1 / 9, 0.0])
def test_gradients_reach_every_weight(beta):
    head = rpn.RPNHead(num_anchors=6, channels=8, init_stddev=0.1, seed=2)
    features = [tf.constant(f) for f in pyramid()]
    anchors = A.generate_anchors(IMAGE, STRIDES, SCALES, RATIOS)
    gt = np.array([[[4, 4, 20, 30], [10, 30, 40, 60]], [[0, 0, 20, 20], [0, 0, 0, 0]]], np.float32)
    labels, matched = A.label_anchors(anchors, gt, [2, 1])
    labels = A.sample_anchors(labels, 32, seed=0)
    targets = A.rpn_targets(anchors, gt, matched, labels)
    with tf.GradientTape() as tape:
        class_loss, box_loss = rpn.rpn_losses(*head(features), labels, targets, beta=beta)
        total = class_loss + box_loss
    assert float(box_loss) > 0
    gradients = tape.gradient(total, head.trainable_variables)
    assert len(gradients) == 6
    for gradient in gradients:
        assert gradient is not None
        assert np.all(np.isfinite(gradient.numpy())) and np.any(gradient.numpy() != 0)


def test_rpn_step_runs_traced():
    head = rpn.RPNHead(num_anchors=6, channels=8, seed=0)
    anchors = A.generate_anchors(IMAGE, STRIDES, SCALES, RATIOS)
    features = [tf.constant(f) for f in pyramid()]

    @tf.function
    def losses(features, gt, num_gt):
        labels, matched = A.label_anchors(anchors, gt, num_gt)
        labels = A.sample_anchors(labels, 32, seed=0)
        return rpn.rpn_losses(*head(features), labels, A.rpn_targets(anchors, gt, matched, labels))

    gt = np.array([[[4, 4, 20, 30]], [[0, 0, 0, 0]]], np.float32)
    traced = [float(x) for x in losses(features, gt, np.array([1, 0], np.int32))]
    eager = [float(x) for x in losses.python_function(features, gt, np.array([1, 0], np.int32))]
    np.testing.assert_allclose(traced, eager, rtol=1e-5)
