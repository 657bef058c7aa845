"""The assembled Mask R-CNN: losses at initialization, both paths, save/load and export round trips."""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras

from conftest import synthetic_batch, tiny_config
from minimask import export as export_lib
from minimask.model import LOSS_NAMES, MaskRCNN


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return MaskRCNN(tiny_config()).build_all()


def _tensors(batch):
    return {k: tf.convert_to_tensor(v) for k, v in batch.items()}


def test_initial_losses_near_their_expected_values(model):
    cfg = model.config
    losses = model.compute_losses(_tensors(synthetic_batch(cfg, (3, 2))), training=False)
    losses = {name: float(value) for name, value in losses.items()}
    assert set(losses) == set(LOSS_NAMES)
    assert losses["rpn_class"] == pytest.approx(math.log(2), abs=0.05)  # 50/50 objectness
    assert losses["class"] == pytest.approx(math.log(cfg.num_classes + 1), abs=0.3)  # uniform over K+1
    assert losses["mask"] == pytest.approx(math.log(2), abs=0.05)  # 50/50 per pixel


@pytest.mark.parametrize("objects", [(0, 0), (0, 3), (4, 4)])
def test_empty_and_full_images_give_finite_losses_and_gradients(model, objects):
    batch = _tensors(synthetic_batch(model.config, objects, seed=sum(objects)))
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, training=True)
        total = tf.add_n(list(losses.values()))
    grads = tape.gradient(total, model.trainable_variables)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)
    if sum(objects) == 0:  # nothing to regress or mask
        assert float(losses["rpn_box"]) == 0.0 and float(losses["box"]) == 0.0 and float(losses["mask"]) == 0.0


def test_inference_shapes_and_padding(model):
    cfg = model.config
    out = model.predict_batch(synthetic_batch(cfg, (1, 0))["image"])
    d = cfg.max_detections
    assert out["boxes"].shape == (2, d, 4) and out["scores"].shape == (2, d)
    assert out["masks"].shape == (2, d, cfg.mask_size, cfg.mask_size)
    for b in range(2):
        n = out["num_detections"][b]
        assert np.all(out["scores"][b, n:] == 0)
        assert np.all(out["boxes"][b, :n, 2:] >= out["boxes"][b, :n, :2])
    dets = model.detect(synthetic_batch(cfg, (1, 0))["image"])
    assert dets[0]["masks"].shape[1:] == (cfg.image_size, cfg.image_size)


def test_stages_choose_what_trains(model):
    model.set_stage("heads_finetune")
    names = {v.path.split("/")[0] for v in model.trainable_variables}
    assert names == {"box_head", "mask_head"}
    model.set_stage("rpn_finetune")
    assert {v.path.split("/")[0] for v in model.trainable_variables} == {"rpn_head"}
    model.set_stage("joint")
    assert len(model.trainable_variables) > 20
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("everything")


def test_keras_save_load_round_trip(model, tmp_path):
    images = synthetic_batch(model.config, (2, 1))["image"]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    a, b = model.predict_batch(images), loaded.predict_batch(images)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
    assert loaded.config == model.config


def test_saved_model_in_fresh_process_equals_keras(model, tmp_path):
    images = synthetic_batch(model.config, (2, 1), seed=5)["image"]
    export_lib.export_saved_model(model, str(tmp_path / "exported"))
    expected = export_lib.serving_outputs(model, tf.constant(images))
    np.save(tmp_path / "images.npy", images)
    # a fresh process with plain TensorFlow: minimask is never imported there
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        served = tf.saved_model.load({str(tmp_path / 'exported')!r})
        out = served.serve(tf.constant(np.load({str(tmp_path / 'images.npy')!r})))
        np.savez({str(tmp_path / 'served.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})
        assert "minimask" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path),
                   env={**os.environ, "PYTHONPATH": ""})
    served = np.load(tmp_path / "served.npz")
    assert set(served.files) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(served[key], value.numpy(), atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def pixel_model():
    keras.utils.set_random_seed(1)
    return MaskRCNN(tiny_config(mask_head_pixels=4)).build_all()


def test_roi_pixels_are_cut_like_the_mask_targets(pixel_model):
    """The mask head's pixel crops and its targets come from the same RoIAlign sampling: an
    image whose ink is a gt mask gives, cut along any RoI, that RoI's mask target."""
    from minimask import backbone as backbone_lib
    from minimask.targets import mask_targets_for_rois
    cfg = pixel_model.config
    batch = synthetic_batch(cfg, (2, 1), seed=3)
    rng = np.random.default_rng(4)
    corner = rng.uniform(0, cfg.image_size * 0.6, size=(2, 5, 2))
    rois = np.concatenate([corner, corner + rng.uniform(6, 30, size=(2, 5, 2))], -1).astype(np.float32)
    matched = rng.integers(0, 2, size=(2, 5)).astype(np.int32)
    matched[1] = 0  # the second image has one mask
    images = np.zeros_like(batch["image"])
    targets = mask_targets_for_rois(tf.constant(batch["masks"]), tf.constant(rois), tf.constant(matched),
                                    cfg.mask_size).numpy()  # [2, 5, m, m] in {0, 1}
    for r in range(5):
        # each image holds only the mask matched to RoI r as ink (255) on black
        for b in range(2):
            images[b] = 255 * batch["masks"][b, matched[b, r]][..., None]
        pixels = pixel_model.roi_pixels(tf.constant(images), tf.constant(rois)).numpy()  # [2, 5, m, m, 3]
        black = backbone_lib.normalize_images(tf.zeros([1, 1, 1, 3], tf.uint8), cfg.pixel_normalization).numpy()
        white = backbone_lib.normalize_images(tf.fill([1, 1, 1, 3], tf.constant(255, tf.uint8)),
                                              cfg.pixel_normalization).numpy()
        ink = ((pixels - black) / (white - black))[:, r].mean(-1)  # [2, m, m] in [0, 1]
        assert ink.shape == targets[:, r].shape
        agree = (ink >= 0.5) == (targets[:, r] > 0)
        assert agree.mean() > 0.999, (r, agree.mean())
        assert targets[:, r].sum() > 0 or ink.max() < 0.5


def test_model_with_pixel_mask_head_trains_saves_and_exports(pixel_model, tmp_path):
    batch = _tensors(synthetic_batch(pixel_model.config, (2, 3), seed=6))
    with tf.GradientTape() as tape:
        losses = pixel_model.compute_losses(batch, training=True)
        total = tf.add_n(list(losses.values()))
    assert float(losses["mask"]) == pytest.approx(math.log(2), abs=0.05)
    kernel = pixel_model.mask_head.pixel_conv.kernel
    grad = tape.gradient(total, kernel)
    assert grad is not None and np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).max() > 0

    images = synthetic_batch(pixel_model.config, (2, 1), seed=7)["image"]
    path = str(tmp_path / "model.keras")
    pixel_model.save(path)
    loaded = keras.models.load_model(path)
    expected = pixel_model.predict_batch(images)
    for key, value in loaded.predict_batch(images).items():
        np.testing.assert_allclose(value, expected[key], atol=1e-5, err_msg=key)
    export_lib.export_saved_model(pixel_model, str(tmp_path / "exported"))
    exported = tf.saved_model.load(str(tmp_path / "exported"))  # keep it referenced: it owns the variables
    served = exported.serve(tf.constant(images))
    for key, value in export_lib.serving_outputs(pixel_model, tf.constant(images)).items():
        np.testing.assert_allclose(served[key].numpy(), value.numpy(), atol=1e-5, err_msg=key)
    with pytest.raises(ValueError, match="images"):
        pixel_model.mask_branch(pixel_model.features(tf.constant(images)), tf.zeros([2, 1, 4]))
