"""Tests of minimask.fpn: shapes and strides, a numpy reference of the top-down pathway,
size-divisibility handling, gradients through backbone + FPN, and .keras serialisation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from minimask import backbone as bb
from minimask import conv, fpn


@pytest.fixture(scope="module")
def mini_fpn():
    return fpn.build_backbone_fpn("mini_resnet", fpn_width=32)


@pytest.mark.parametrize("height, width", [(64, 64), (128, 128), (224, 224), (256, 256), (64, 160)])
def test_pyramid_shapes_and_strides(mini_fpn, height, width):
    outputs = mini_fpn(np.zeros((2, height, width, 3), np.float32), training=False)
    assert len(outputs) == 5
    for k, p in zip((2, 3, 4, 5), outputs):
        assert p.shape == (2, height // 2**k, width // 2**k, 32), k
    # P6 = every other cell of P5: ceil(P5 / 2) (224 -> P5 7x7 -> P6 4x4).
    assert outputs[4].shape == (2, -(-height // 64), -(-width // 64), 32)
    np.testing.assert_array_equal(outputs[4], outputs[3][:, ::2, ::2])
    assert mini_fpn.output_names == ["P2", "P3", "P4", "P5", "P6"]


def test_static_shape_that_is_not_a_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="128x96"):
        fpn.build_backbone_fpn("micro_resnet", (100, 96, 3), fpn_width=8)
    # A static model with a good size has static pyramid shapes.
    model = fpn.build_backbone_fpn("micro_resnet", (96, 64, 3), fpn_width=8)
    assert [tuple(o.shape[1:3]) for o in model.outputs] == [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)]


def test_dynamic_shape_that_is_not_a_multiple_of_32_fails_at_run_time(mini_fpn):
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 32"):
        mini_fpn(np.zeros((1, 100, 128, 3), np.float32))
    # ... and works once padded.
    padded = fpn.pad_to_multiple(np.zeros((1, 100, 128, 3), np.float32))
    assert mini_fpn(padded)[0].shape == (1, 32, 32, 32)


def test_build_fpn_refuses_maps_that_do_not_line_up():
    c = [keras.Input((25, 25, 8)), keras.Input((13, 13, 8)), keras.Input((7, 7, 8)), keras.Input((4, 4, 8))]
    with pytest.raises(ValueError, match="pad_to_multiple"):
        fpn.build_fpn(c, width=8)
    with pytest.raises(ValueError, match="4 maps"):
        fpn.build_fpn(c[:3], width=8)


def test_pad_to_multiple():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(2, 33, 64, 3), dtype=np.uint8)
    padded = fpn.pad_to_multiple(images).numpy()
    assert padded.shape == (2, 64, 64, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, :33], images)  # the image stays where it was
    assert not padded[:, 33:].any()  # bottom rows are zeros
    single = fpn.pad_to_multiple(images[0], multiple=16).numpy()
    assert single.shape == (48, 64, 3)
    assert fpn.padded_size(64) == 64 and fpn.padded_size(65) == 96
    with pytest.raises(ValueError, match="images"):
        fpn.pad_to_multiple(np.zeros((4, 4)))


def _numpy_fpn(c_maps, model, width):
    """Lin et al. 2017, Fig. 3, in numpy with minimask.conv.conv2d as the convolution."""

    def layer_conv(name, x):
        kernel, bias = model.get_layer(name).get_weights()
        return conv.conv2d(x, kernel, bias, padding="same")

    merged = {5: layer_conv("fpn_lateral5", c_maps[3])}
    for k in (4, 3, 2):
        upsampled = merged[k + 1].repeat(2, axis=1).repeat(2, axis=2)  # nearest neighbour 2x
        merged[k] = layer_conv(f"fpn_lateral{k}", c_maps[k - 2]) + upsampled
    pyramid = [layer_conv(f"fpn_smooth{k}", merged[k]) for k in (2, 3, 4, 5)]
    return pyramid + [pyramid[-1][:, ::2, ::2]]


def test_fpn_equals_numpy_reference():
    rng = np.random.default_rng(0)
    channels, width = (4, 6, 8, 10), 5
    inputs = [keras.Input((16 // 2**i, 16 // 2**i, c)) for i, c in enumerate(channels)]
    model = keras.Model(inputs, fpn.build_fpn(inputs, width=width))
    for layer in model.layers:  # random biases too (Keras starts them at zero)
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape) for w in layer.get_weights()])
    c_maps = [rng.normal(size=(2, 16 // 2**i, 16 // 2**i, c)).astype(np.float32) for i, c in enumerate(channels)]
    for ours, reference in zip(model(c_maps), _numpy_fpn(c_maps, model, width)):
        np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_trainable_weight(mini_fpn):
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), tf.float32)
    with tf.GradientTape() as tape:
        pyramid = mini_fpn(x, training=True)
        # A random projection of every level, so that no gradient cancels by symmetry.
        loss = tf.add_n([tf.reduce_sum(p * tf.random.stateless_normal(tf.shape(p), seed=(k, 0)))
                         for k, p in enumerate(pyramid)])
    weights = mini_fpn.trainable_weights
    grads = tape.gradient(loss, weights)
    assert len(weights) > 50  # backbone (conv kernels, BN gamma/beta) + FPN (kernels, biases)
    for weight, grad in zip(weights, grads):
        assert grad is not None, weight.path
        assert np.any(grad.numpy() != 0), weight.path


def test_frozen_backbone_in_backbone_fpn():
    model = fpn.build_backbone_fpn("micro_resnet", fpn_width=8, freeze_stages=5)
    # Only the FPN's 8 convolutions (kernel + bias each) remain trainable.
    assert len(model.trainable_weights) == 16
    assert all(w.path.startswith("fpn_") for w in model.trainable_weights)
    # freeze() finds the backbone's layers inside the combined model.
    model = fpn.build_backbone_fpn("micro_resnet", fpn_width=8)
    bb.freeze(model, freeze_stages=3, freeze_batchnorm=True)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert "stage4_block1_conv1" in trainable and "fpn_lateral2" in trainable
    assert not any(name.startswith(("stem_", "stage2_", "stage3_")) or "_bn" in name for name in trainable)


def test_keras_save_and_load_round_trip(tmp_path):
    model = fpn.build_backbone_fpn("micro_resnet", fpn_width=8)
    path = tmp_path / "backbone_fpn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    for a, b in zip(model(x, training=False), loaded(x, training=False)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert loaded.get_layer("size_check").get_config()["multiple"] == 32


def test_multiply_adds_of_backbone_plus_fpn():
    """count_multiply_adds looks inside the nested backbone; the FPN part worked out by hand."""
    combined = fpn.build_backbone_fpn("mini_resnet", (128, 128, 3), fpn_width=64)
    backbone_only = bb.count_multiply_adds(bb.build_backbone("mini_resnet", (128, 128, 3)))
    cells = [32 * 32, 16 * 16, 8 * 8, 4 * 4]  # P2..P5 at 128x128
    laterals = sum(n * c * 64 for n, c in zip(cells, (32, 64, 128, 256)))  # 1x1 convs C_k -> 64
    smoothing = sum(cells) * 3 * 3 * 64 * 64  # 3x3 convs 64 -> 64
    assert bb.count_multiply_adds(combined) == backbone_only + laterals + smoothing  # 120.5 M
