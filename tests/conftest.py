"""Shared fixtures: a tiny Mask R-CNN config that builds and steps in seconds on a CPU."""
import numpy as np
import pytest

from minimask.config import Config


def tiny_config(**overrides):
    """A 64x64 model with narrow layers: for tests of plumbing, not of quality."""
    base = dict(
        name="tiny", image_size=64, backbone="micro_resnet", fpn_width=16, max_instances=4, max_ignore=2,
        anchor_scales=((8,), (16,), (32,), (64,), (128,)), rpn_samples_per_image=64,
        rpn_pre_nms_train=200, rpn_post_nms_train=50, rpn_pre_nms_test=100, rpn_post_nms_test=30,
        rois_per_image=16, roi_canonical_size=32.0, box_head_width=32, mask_head_convs=1, mask_head_width=16,
        max_detections=10, batch_size=2, warmup_steps=2, steps_per_epoch=4, learning_rate=1e-3,
    )
    base.update(overrides)
    return Config(**base)


@pytest.fixture
def tiny():
    return tiny_config()


def synthetic_batch(config, num_objects=(2, 0), seed=0):
    """A padded batch with the given number of square objects per image (0 = an empty image)."""
    rng = np.random.default_rng(seed)
    s, m = config.image_size, config.max_instances
    b = len(num_objects)
    batch = {
        "image": rng.integers(0, 60, size=(b, s, s, 3)).astype(np.uint8),
        "boxes": np.zeros((b, m, 4), np.float32),
        "class_ids": np.zeros((b, m), np.int32),
        "masks": np.zeros((b, m, s, s), bool),
        "num_instances": np.array(num_objects, np.int32),
        "ignore_boxes": np.zeros((b, config.max_ignore, 4), np.float32),
        "num_ignore": np.zeros((b,), np.int32),
    }
    for i, n in enumerate(num_objects):
        for j in range(n):
            size = int(rng.integers(10, s // 2))
            y, x = (int(v) for v in rng.integers(0, s - size, size=2))
            batch["masks"][i, j, y:y + size, x:x + size] = True
            batch["boxes"][i, j] = (y, x, y + size, x + size)
            batch["class_ids"][i, j] = int(rng.integers(1, config.num_classes + 1))
            batch["image"][i, y:y + size, x:x + size] = 200
    return batch
