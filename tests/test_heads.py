"""Tests of minimask.heads: shapes, initial loss, losses against numpy, zero positives,
the per-class decoupling of the mask loss, and serialization."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from minimask.heads import BoxHead, MaskHead, box_head_losses, mask_loss

K = 4  # object classes in these tests


def numpy_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_box_head_losses(logits, deltas, classes, targets, positive, valid, beta):
    """Loops over RoIs, written for reading."""
    class_total, box_total, num_valid = 0.0, 0.0, 0
    for n in range(len(logits)):
        if not valid[n]:
            continue
        num_valid += 1
        class_total += -numpy_log_softmax(logits[n])[classes[n]]
        if positive[n]:
            for d in range(4):
                error = abs(deltas[n, classes[n] - 1, d] - targets[n, d])
                box_total += 0.5 * error**2 / beta if error < beta else error - 0.5 * beta
    return class_total / max(num_valid, 1), box_total / max(num_valid, 1)


def numpy_mask_loss(logits, targets, classes, positive):
    total, count = 0.0, 0
    for n in range(len(logits)):
        if not positive[n]:
            continue
        z = logits[n, :, :, classes[n] - 1].astype(np.float64)
        t = targets[n]
        probability = 1 / (1 + np.exp(-z))
        total += np.mean(-(t * np.log(probability) + (1 - t) * np.log(1 - probability)))
        count += 1
    return total / max(count, 1)


def random_targets(rng, n):
    classes = rng.integers(0, K + 1, size=n).astype(np.int32)
    valid = rng.random(n) < 0.8
    classes[~valid] = 0
    positive = (classes > 0) & valid
    return classes, positive, valid


def test_box_head_shapes_and_initial_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    head = BoxHead(num_classes=K, fc_width=64)
    pooled = rng.normal(size=(2, 50, 7, 7, 8)).astype(np.float32)  # [B, R, 7, 7, C]
    logits, deltas = head(pooled)
    assert logits.shape == (2, 50, K + 1) and deltas.shape == (2, 50, K, 4)
    flat_logits, _ = head(pooled.reshape(100, 7, 7, 8))  # [B*R, 7, 7, C] works the same
    np.testing.assert_allclose(flat_logits.numpy().reshape(2, 50, K + 1), logits.numpy(), atol=1e-5)

    classes = rng.integers(0, K + 1, size=(2, 50)).astype(np.int32)
    ones = np.ones((2, 50), bool)
    class_loss, box_loss = box_head_losses(logits, deltas, classes, np.zeros((2, 50, 4)),
                                           classes > 0, ones)
    # Almost-zero logits: the softmax is uniform over K + 1 outputs.
    assert abs(class_loss.numpy() - np.log(K + 1)) < 0.05
    assert abs(deltas.numpy()).max() < 0.05 and box_loss.numpy() < 0.05


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.0])  # 0: plain L1 (the mnist and COCO presets)
def test_box_head_losses_match_numpy(beta):
    rng = np.random.default_rng(int(beta * 10))
    logits = rng.normal(size=(3, 20, K + 1)).astype(np.float32) * 2
    deltas = rng.normal(size=(3, 20, K, 4)).astype(np.float32)
    targets = rng.normal(size=(3, 20, 4)).astype(np.float32)
    classes, positive, valid = random_targets(rng, 60)
    shape = (3, 20)
    got = box_head_losses(logits, deltas, classes.reshape(shape), targets, positive.reshape(shape),
                          valid.reshape(shape), smooth_l1_beta=beta)
    want = numpy_box_head_losses(logits.reshape(60, -1), deltas.reshape(60, K, 4), classes,
                                 targets.reshape(60, 4), positive, valid, beta)
    np.testing.assert_allclose([g.numpy() for g in got], want, rtol=1e-5)


def test_mask_loss_matches_numpy_and_ignores_other_classes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 28, 28, K)).astype(np.float32) * 3
    targets = (rng.random((30, 28, 28)) < 0.4).astype(np.float32)
    classes, positive, _ = random_targets(rng, 30)
    got = mask_loss(logits, targets, classes, positive).numpy()
    np.testing.assert_allclose(got, numpy_mask_loss(logits, targets, classes, positive), rtol=1e-5)

    # Changing every channel except each positive RoI's gt channel, and every channel of the
    # non-positive RoIs, leaves the loss unchanged: the classes do not compete.
    keep = np.zeros_like(logits, bool)
    for n in np.nonzero(positive)[0]:
        keep[n, :, :, classes[n] - 1] = True
    scrambled = np.where(keep, logits, rng.normal(size=logits.shape) * 10).astype(np.float32)
    np.testing.assert_allclose(mask_loss(scrambled, targets, classes, positive).numpy(), got,
                               rtol=1e-6)
    # ... whereas changing a gt channel does change it (the test can fail).
    changed = np.where(keep, logits + 1.0, logits).astype(np.float32)
    assert abs(mask_loss(changed, targets, classes, positive).numpy() - got) > 1e-3

    # The gradient reaches only the gt channels of positive RoIs.
    logits_var = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = mask_loss(logits_var, targets, classes, positive)
    grad = tape.gradient(loss, logits_var).numpy()
    assert (grad[~keep] == 0).all() and (grad[keep] != 0).any()


def test_zero_positives_give_zero_losses_and_finite_gradients():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(2)
    box_head = BoxHead(num_classes=K, fc_width=16)
    mask_head = MaskHead(num_classes=K, num_convs=1, width=8)
    box_pooled = tf.constant(rng.normal(size=(6, 7, 7, 4)).astype(np.float32))
    mask_pooled = tf.constant(rng.normal(size=(6, 14, 14, 4)).astype(np.float32))
    classes = np.zeros(6, np.int32)
    no = np.zeros(6, bool)
    for valid in (np.ones(6, bool), no):  # background RoIs only; then no valid RoI at all
        with tf.GradientTape() as tape:
            logits, deltas = box_head(box_pooled)
            masks = mask_head(mask_pooled)
            class_loss, box_loss = box_head_losses(logits, deltas, classes, np.zeros((6, 4)), no,
                                                   valid)
            m_loss = mask_loss(masks, np.zeros((6, 28, 28)), classes, no)
            total = class_loss + box_loss + m_loss
        assert box_loss.numpy() == 0.0 and m_loss.numpy() == 0.0
        assert (class_loss.numpy() > 0) == valid.any()
        grads = tape.gradient(total, box_head.trainable_weights + mask_head.trainable_weights)
        assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)


def test_mask_head_shapes_and_initial_logits():
    keras.utils.set_random_seed(2)
    head = MaskHead(num_classes=K, num_convs=2, width=16)
    pooled = np.random.default_rng(3).normal(size=(2, 5, 14, 14, 8)).astype(np.float32)
    logits = head(pooled)
    assert logits.shape == (2, 5, 28, 28, K)
    assert abs(logits.numpy()).max() < 0.1  # N(0, 0.001^2) predictor: sigmoid ~ 0.5 everywhere
    assert len(head.trainable_weights) == 2 * (2 + 1 + 1)  # 2 convs, upsample, predictor


@pytest.mark.parametrize("make, shape", [
    (lambda: BoxHead(num_classes=K, fc_width=32, name="box_head"), (7, 7, 8)),
    (lambda: MaskHead(num_classes=K, num_convs=2, width=8, name="mask_head"), (14, 14, 8)),
])
def test_serialization_round_trip(make, shape, tmp_path):
    keras.utils.set_random_seed(4)
    layer = make()
    pooled = np.random.default_rng(5).normal(size=(3, *shape)).astype(np.float32)
    out = layer(pooled)

    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build((None, *shape))
    clone.set_weights(layer.get_weights())
    for a, b in zip(tf.nest.flatten(clone(pooled)), tf.nest.flatten(out)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)

    # Through a .keras file inside a functional model.
    inputs = keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(tf.nest.flatten(loaded(pooled)), tf.nest.flatten(out)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_classes"):
        BoxHead(num_classes=0)
    with pytest.raises(ValueError, match="num_convs"):
        MaskHead(num_classes=3, num_convs=-1)
    with pytest.raises(ValueError, match="pooled features"):
        BoxHead(num_classes=3)(np.zeros((4, 49), np.float32))


def test_mask_head_with_pixels_uses_them_and_round_trips():
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(7)
    head = MaskHead(num_classes=K, num_convs=1, width=8, pixel_channels=4, name="mask_head")
    pooled = rng.normal(size=(2, 3, 14, 14, 8)).astype(np.float32)
    pixels = rng.normal(size=(2, 3, 28, 28, 3)).astype(np.float32)
    logits = head(pooled, pixels)
    assert logits.shape == (2, 3, 28, 28, K)
    assert [tuple(w.shape) for w in head.pixel_conv.weights] == [(3, 3, 3, 4), (4,)]
    assert tuple(head.mask_logits.kernel.shape) == (1, 1, 8 + 4, K)  # features and pixels side by side
    # the logits depend on the pixels (and only through pixel_conv's channels)
    assert not np.allclose(head(pooled, pixels + 1.0).numpy(), logits.numpy())
    with pytest.raises(ValueError, match="pixels"):
        head(pooled)

    clone = MaskHead.from_config(head.get_config())
    assert clone.get_config()["pixel_channels"] == 4
    clone(pooled, pixels)
    clone.set_weights(head.get_weights())
    np.testing.assert_allclose(clone(pooled, pixels).numpy(), logits.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="pixel_channels"):
        MaskHead(num_classes=3, pixel_channels=-1)
