"""Tests of minimask.backbone against keras.applications and published parameter counts."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from minimask import backbone as bb
from minimask import conv


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def resnet50_pair():
    """(ours, keras.applications') ResNet-50 without head, both random, built once."""
    ours = bb.build_backbone("resnet50")
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    return ours, reference


def test_resnet50_parameter_count_equals_keras_applications(resnet50_pair):
    ours, reference = resnet50_pair
    # keras.applications.ResNet50(include_top=False): 23,587,712 parameters, of which
    # 53,120 are BatchNorm moving statistics (non-trainable).
    assert reference.count_params() == 23_587_712
    assert ours.count_params() == reference.count_params()
    assert _trainable_count(ours) == _trainable_count(reference) == 23_534_592


def test_resnet50_random_weights_copied_from_keras_give_equal_c5(resnet50_pair):
    """The loader and the architecture at once: same weights -> same C5 (inference mode)."""
    ours, reference = resnet50_pair
    rng = np.random.default_rng(0)
    for layer in reference.layers:  # non-trivial BN statistics too, so that a swap would show
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.1, n), rng.uniform(0.5, 2.0, n)])
        elif isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([w + rng.normal(0, 0.01, w.shape) for w in layer.get_weights()])
    pairs = bb.copy_weights_by_sequence(reference, ours)
    assert len(pairs) == 2 * 53  # 53 convolutions (1 stem + 16 blocks x 3 + 4 projections), 53 BNs
    assert ("conv2_block1_0_conv", "stage2_block1_shortcut_conv") in pairs
    assert ("conv5_block3_3_bn", "stage5_block3_bn3") in pairs

    x = rng.normal(size=(2, 64, 96, 3)).astype(np.float32)
    c5_ours = ours(x, training=False)[-1].numpy()
    c5_reference = reference(x, training=False).numpy()
    assert c5_ours.shape == c5_reference.shape == (2, 2, 3, 2048)
    np.testing.assert_allclose(c5_ours, c5_reference, rtol=1e-4, atol=1e-4 * np.abs(c5_reference).max())


def test_copy_weights_rejects_a_different_architecture(resnet50_pair):
    _, reference = resnet50_pair
    with pytest.raises(ValueError, match="conv/BN layers"):
        bb.copy_weights_by_sequence(reference, bb.build_backbone("resnet101"))
    with pytest.raises(ValueError, match="does not match"):
        bb.copy_weights_by_sequence(reference, bb.build_backbone("resnext50_32x4d"))


def test_resnet101_parameter_count_equals_keras_applications():
    ours = bb.build_backbone("resnet101")
    reference = keras.applications.ResNet101(include_top=False, weights=None, input_shape=(None, None, 3))
    assert ours.count_params() == reference.count_params() == 42_658_176


@pytest.mark.parametrize("name, torchvision_total", [
    # torchvision.models.<name>(): total parameters including the 1000-class fc layer
    # (torchvision model docs / sum(p.numel() for p in model.parameters())). The fc has
    # 512*1000 + 1000 = 513,000 parameters after 512 channels, 2048*1000 + 1000 = 2,049,000
    # after 2048. torchvision's convolutions have no bias, and its BatchNorm counts only
    # gamma and beta as parameters (moving statistics are buffers), which is exactly what
    # Keras calls *trainable* weights.
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnext50_32x4d", 25_028_904),  # -> 22,979,904 without fc
])
def test_parameter_counts_match_torchvision(name, torchvision_total):
    model = bb.build_backbone(name)
    fc = 1000 * model.outputs[-1].shape[-1] + 1000
    assert _trainable_count(model) == torchvision_total - fc


def test_resnext_uses_grouped_convolutions():
    model = bb.build_backbone("resnext50_32x4d")
    conv = model.get_layer("stage2_block1_conv2")
    assert conv.groups == 32 and tuple(conv.kernel.shape) == (3, 3, 4, 128)  # 32 groups of 4 channels
    assert model.get_layer("stage3_block1_conv2").strides == (2, 2)  # stride on the 3x3 (Xie et al.)


@pytest.mark.parametrize("size", [224, 128])
@pytest.mark.parametrize("name", ["resnet50", "resnet18", "mini_resnet"])
def test_feature_shapes_and_strides(name, size, resnet50_pair):
    model = resnet50_pair[0] if name == "resnet50" else bb.build_backbone(name)
    outputs = model(np.zeros((1, size, size, 3), np.float32), training=False)
    channels = bb.PRESETS[name].out_channels
    assert [o.shape for o in outputs] == [(1, size // s, size // s, c) for s, c in zip((4, 8, 16, 32), channels)]
    assert model.output_names == ["C2", "C3", "C4", "C5"]


def test_static_input_shape_and_name_prefix():
    model = bb.build_backbone("micro_resnet", (64, 96, 3), name_prefix="bb_")
    assert [tuple(o.shape) for o in model.outputs] == [(None, 16, 24, 16), (None, 8, 12, 32),
                                                       (None, 4, 6, 64), (None, 2, 3, 128)]
    assert model.output_names == ["bb_C2", "bb_C3", "bb_C4", "bb_C5"]
    assert model.get_layer("bb_stage3_block1_conv1").strides == (2, 2)


def test_every_weight_layer_is_named_by_stage():
    model = bb.build_backbone("resnet18")
    for layer in model.layers:
        if layer.weights:
            assert bb.stage_of_layer(layer.name) in (1, 2, 3, 4, 5), layer.name


def test_freeze_stages_changes_trainable_flags():
    for k in range(6):
        model = bb.build_backbone("micro_resnet", freeze_stages=k)
        for layer in model.layers:
            stage = bb.stage_of_layer(layer.name)
            if stage is not None and layer.weights:
                assert layer.trainable == (stage > k), (k, layer.name)
    everything = _trainable_count(bb.build_backbone("micro_resnet"))
    counts = [_trainable_count(bb.build_backbone("micro_resnet", freeze_stages=k)) for k in range(6)]
    assert counts[0] == everything and counts[5] == 0
    assert all(a > b for a, b in zip(counts, counts[1:]))
    with pytest.raises(ValueError, match="freeze_stages"):
        bb.build_backbone("micro_resnet", freeze_stages=6)


def test_freeze_batchnorm_runs_batchnorm_in_inference_mode():
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    frozen = bb.build_backbone("micro_resnet", freeze_batchnorm=True)
    batchnorms = [layer for layer in frozen.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorms and not any(layer.trainable for layer in batchnorms)
    assert all(layer.trainable for layer in frozen.layers if isinstance(layer, keras.layers.Conv2D))
    # training=True must not switch to batch statistics nor update the moving ones.
    before = [w.numpy() for w in frozen.non_trainable_weights]
    np.testing.assert_allclose(frozen(x, training=True)[-1], frozen(x, training=False)[-1], atol=1e-5)
    for a, b in zip(before, frozen.non_trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())
    # Whereas a normal backbone uses batch statistics in training mode.
    normal = bb.build_backbone("micro_resnet")
    assert not np.allclose(normal(x, training=True)[-1], normal(x, training=False)[-1], atol=1e-3)


def test_weights_file_round_trip(tmp_path):
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    trained = bb.build_backbone("micro_resnet")
    path = tmp_path / "micro.weights.h5"
    trained.save_weights(path)
    loaded = bb.build_backbone("micro_resnet", weights=str(path), freeze_stages=2)
    for a, b in zip(trained(x, training=False), loaded(x, training=False)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not loaded.get_layer("stage2_block1_conv1").trainable  # freezing applies after loading
    with pytest.raises(FileNotFoundError):
        bb.build_backbone("micro_resnet", weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="weights.h5"):
        bb.build_backbone("micro_resnet", weights="model.h5")


def test_imagenet_download_failure_raises_runtime_error(monkeypatch):
    def offline(**kwargs):  # what keras' get_file raises without network
        raise Exception("URL fetch failure on https://...: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(RuntimeError, match="pass weights=None"):
        bb.build_backbone("resnet50", weights="imagenet")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        bb.build_backbone("mini_resnet", weights="imagenet")
    with pytest.raises(ValueError, match="unknown backbone"):
        bb.build_backbone("resnet51")


def test_preprocess_images():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    x = bb.preprocess_images(images)
    assert x.dtype == tf.float32 and x.shape == images.shape
    np.testing.assert_allclose(x[0, 0, 0, 1], (images[0, 0, 0, 1] / 255 - 0.456) / 0.224, rtol=1e-6)
    caffe = bb.preprocess_images(images, mode="caffe")
    np.testing.assert_allclose(caffe[0, 0, 0, 0], images[0, 0, 0, 2] - 103.939, rtol=1e-6)  # B first
    # Undoing the normalisation gives the pixels back, channel by channel.
    np.testing.assert_allclose(x * np.float32(bb.IMAGENET_STD_RGB) + np.float32(bb.IMAGENET_MEAN_RGB),
                               images / 255, atol=1e-6)
    assert bb.normalize_images is bb.preprocess_images
    with pytest.raises(ValueError, match="mode"):
        bb.preprocess_images(images, mode="torch")
    with pytest.raises(ValueError, match="RGB"):
        bb.preprocess_images(images[..., :2])


# ---------------------------------------------------------------- geometry and cost

def test_backbone_geometry_hand_worked():
    geometry = bb.backbone_geometry("resnet50")
    # Stem r = 11, jump 4; each 3x3 then adds 2 * jump: stage 2: 11 + 3*8 = 35; stage 3:
    # 35 + 4*16 = 99; stage 4: 99 + 6*32 = 291; stage 5: 291 + 3*64 = 483, the value
    # Araujo et al. (Distill 2019, "Computing Receptive Fields of CNNs") list for ResNet-50.
    assert {k: (f.size, f.jump, f.start) for k, f in geometry.items()} == {
        "C2": (35, 4, 0.0), "C3": (99, 8, 0.0), "C4": (291, 16, 0.0), "C5": (483, 32, 0.0)}
    # resnet18: stem 11, then two 3x3 per block: 11 + 2*2*8 = 43 for C2.
    assert bb.backbone_geometry("resnet18")["C2"].size == 43


@pytest.mark.parametrize("name", sorted(bb.PRESETS))
def test_geometry_jumps_are_the_real_strides(name):
    geometry = bb.backbone_geometry(name)
    assert [geometry[k].jump for k in ("C2", "C3", "C4", "C5")] == [4, 8, 16, 32]


def test_gradient_support_lies_inside_the_receptive_field():
    """A C2/C3 cell of micro_resnet only depends on image pixels inside its receptive field."""
    keras.utils.set_random_seed(0)
    model = bb.build_backbone("micro_resnet", (64, 64, 3))
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), tf.float32)
    geometry = bb.backbone_geometry("micro_resnet")
    for level, feature_index in (("C2", 0), ("C3", 1)):
        cell = 4
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(model(x, training=False)[feature_index][0, cell, cell])
        grad = np.abs(tape.gradient(value, x).numpy()[0]).sum(axis=-1)  # [64, 64]
        rows, cols = np.nonzero(grad)
        first, last = conv.receptive_field_bounds(geometry[level], cell)
        assert rows.size > 0
        assert first <= rows.min() and rows.max() <= last and first <= cols.min() and cols.max() <= last
        # ... and reaches close to both ends (a max pool may cut a pixel or two).
        assert rows.max() - rows.min() >= geometry[level].size - 4


def test_mini_resnet_is_cheap():
    """The CPU budget of the course: mini_resnet at 128x128 is far below 0.5 GFLOP."""
    model = bb.build_backbone("mini_resnet", (128, 128, 3))
    multiply_adds = bb.count_multiply_adds(model)
    # By hand: stem 64*64*27*32 = 3.5M; stage 2: 2 * 32*32*288*32 = 18.9M; ...
    assert 60e6 < multiply_adds < 70e6  # 66.5 M multiply-adds = 0.13 GFLOP
    with pytest.raises(ValueError, match="static"):
        bb.count_multiply_adds(bb.build_backbone("mini_resnet"))
