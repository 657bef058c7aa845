"""Tests of minimask.pretrain: digit crops, the classifier, a tiny training run, weights I/O."""
import numpy as np
import pytest

from minimask import backbone as bb
from minimask import pretrain
from synthetic_data import MnistDetection


def test_digit_crops_are_single_scene_digits():
    images, labels = pretrain.digit_crops("val", 20, size=48, seed=3, digit_size=(14, 40))
    assert images.shape == (20, 48, 48, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int32 and set(labels) <= set(range(10))
    # Exactly what the scene generator renders with one digit per scene.
    scenes = MnistDetection(split="val", num_scenes=20, seed=3, image_size=48, min_digits=1, max_digits=1,
                            empty_fraction=0.0, digit_size=(14, 40))
    for i in (0, 7, 19):
        drawn = scenes.draw(i)
        np.testing.assert_array_equal(images[i], drawn.image)
        np.testing.assert_array_equal(images[i], scenes[i]["image"])
        assert len(drawn.class_ids) == 1 and labels[i] == drawn.class_ids[0] - 1
    # Deterministic, and the seed matters.
    np.testing.assert_array_equal(pretrain.digit_crops("val", 20, size=48, seed=3, digit_size=(14, 40))[0], images)
    assert not np.array_equal(pretrain.digit_crops("val", 20, size=48, seed=4, digit_size=(14, 40))[0], images)


def test_build_classifier_shares_the_backbone():
    backbone = bb.build_backbone("micro_resnet", (32, 32, 3))
    classifier = pretrain.build_classifier(backbone, num_classes=7, dense_units=None)
    probabilities = classifier(np.zeros((3, 32, 32, 3), np.float32)).numpy()
    assert probabilities.shape == (3, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    backbone_weights = {id(w) for w in backbone.weights}
    assert backbone_weights <= {id(w) for w in classifier.weights}  # shared, not copied


def test_tiny_pretraining_decreases_loss_and_weights_load_back(tmp_path):
    path = tmp_path / "micro.weights.h5"
    result = pretrain.pretrain_backbone("micro_resnet", epochs=3, num_train=256, num_val=64, num_test=64,
                                        image_size=32, batch_size=32, digit_size=(14, 28),
                                        learning_rate=3e-3, seed=0, out_path=str(path))
    losses = result.history["loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 <= result.test_accuracy <= 1.0 and result.weights_path == str(path)

    fresh = bb.build_backbone("micro_resnet", weights=str(path))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    for trained, loaded in zip(result.backbone(x, training=False), fresh(x, training=False)):
        np.testing.assert_allclose(trained, loaded, atol=1e-5)


def test_pretrain_rejects_a_bad_output_path():
    with pytest.raises(ValueError, match="weights.h5"):
        pretrain.pretrain_backbone("micro_resnet", out_path="backbone.h5")
