"""The detection layer: per-class NMS against a numpy loop, mask pasting against a scalar reference."""
import numpy as np
import pytest
import tensorflow as tf

from minimask import boxes as box_ops
from minimask import postprocess


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_detect(class_logits, deltas, rois, valid, shape, weights, threshold, nms_iou, top_k, pre_nms=None):
    """A plain loop: every (RoI, class) candidate, greedy NMS per class, best top_k overall."""
    h, w = shape
    logits = class_logits - class_logits.max(-1, keepdims=True)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    candidates = []
    for r in range(len(rois)):
        if not valid[r]:
            continue
        for k in range(1, class_logits.shape[-1]):
            box = box_ops.decode(deltas[r, k - 1][None], rois[r][None], weights).numpy()[0]
            box = np.clip(box, 0, [h, w, h, w])
            if scores[r, k] >= threshold and (box[2] - box[0]) * (box[3] - box[1]) > 0:
                candidates.append((scores[r, k], k, box))
    if pre_nms is not None:  # only the best pre_nms candidates enter NMS
        candidates = sorted(candidates, key=lambda c: -c[0])[:pre_nms]
    kept = []
    for k in sorted({c[1] for c in candidates}):
        group = sorted([c for c in candidates if c[1] == k], key=lambda c: -c[0])
        chosen = []
        for c in group:
            if all(_iou(c[2], d[2]) <= nms_iou for d in chosen):
                chosen.append(c)
        kept.extend(chosen)
    kept.sort(key=lambda c: -c[0])
    return kept[:top_k]


@pytest.mark.parametrize("seed, pre_nms", [(0, None), (1, None), (2, None), (3, 7), (4, 15)])
def test_detect_matches_reference(seed, pre_nms):
    rng = np.random.default_rng(seed)
    num_rois, num_classes, size = 12, 3, 64
    centres = rng.uniform(10, 54, size=(num_rois, 2))
    half = rng.uniform(4, 12, size=(num_rois, 2))
    rois = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
    logits = rng.normal(0, 2, size=(num_rois, num_classes + 1)).astype(np.float32)
    deltas = rng.normal(0, 0.5, size=(num_rois, num_classes, 4)).astype(np.float32)
    valid = np.arange(num_rois) < 10
    weights = (10.0, 10.0, 5.0, 5.0)
    out = postprocess.detect(logits[None], deltas[None], rois[None], valid[None], (size, size),
                             box_weights=weights, score_threshold=0.1, nms_iou=0.5, max_detections=8,
                             pre_nms_top_k=pre_nms)
    expected = _reference_detect(logits, deltas, rois, valid, (size, size), weights, 0.1, 0.5, 8, pre_nms)
    n = int(out["num_detections"][0])
    assert n == len(expected)
    np.testing.assert_allclose(out["scores"][0, :n], [c[0] for c in expected], rtol=1e-5)
    np.testing.assert_array_equal(out["class_ids"][0, :n], [c[1] for c in expected])
    np.testing.assert_allclose(out["boxes"][0, :n], np.array([c[2] for c in expected]).reshape(-1, 4), atol=1e-3)
    assert np.all(out["scores"][0, n:] == 0) and np.all(out["class_ids"][0, n:] == 0)


def test_detect_nothing_above_threshold():
    logits = np.zeros((1, 5, 4), np.float32)
    logits[..., 0] = 10.0  # everything is background
    out = postprocess.detect(logits, np.zeros((1, 5, 3, 4), np.float32),
                             np.tile(np.float32([[0, 0, 10, 10]]), (1, 5, 1)), np.ones((1, 5), bool), (32, 32),
                             box_weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_iou=0.5,
                             max_detections=10)
    assert int(out["num_detections"][0]) == 0


def _reference_paste(mask, box, shape):
    """Scalar bilinear sampling of the (zero-ringed) mask at each image pixel centre."""
    m = mask.shape[0]
    padded = np.pad(mask, 1)
    y1, x1, y2, x2 = box
    out = np.zeros(shape, np.float32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            u = (i + 0.5 - y1) / (y2 - y1) * m - 0.5 + 1
            v = (j + 0.5 - x1) / (x2 - x1) * m - 0.5 + 1
            if u < 0 or v < 0 or u > m + 1 or v > m + 1:
                continue
            u0, v0 = int(np.floor(u)), int(np.floor(v))
            du, dv = u - u0, v - v0
            value = 0.0
            for a, wa in ((u0, 1 - du), (u0 + 1, du)):
                for b, wb in ((v0, 1 - dv), (v0 + 1, dv)):
                    if 0 <= a < m + 2 and 0 <= b < m + 2:
                        value += wa * wb * padded[a, b]
            out[i, j] = value
    return out


def test_paste_full_mask_fills_exactly_its_box():
    masks = np.ones((2, 28, 28), np.float32)
    boxes = np.array([[4, 6, 20, 30], [10, 0, 40, 12]], np.float32)
    pasted = postprocess.paste_masks(masks, boxes, (48, 40)).numpy()
    for k, (y1, x1, y2, x2) in enumerate(boxes.astype(int)):
        expected = np.zeros((48, 40), bool)
        expected[y1:y2, x1:x2] = True
        np.testing.assert_array_equal(pasted[k], expected)


def test_paste_matches_scalar_reference():
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(3, 7, 7)).astype(np.float32)
    boxes = np.array([[3.3, 5.1, 17.8, 12.2], [0.0, 0.0, 9.0, 30.0], [20.5, 18.0, 31.9, 31.5]], np.float32)
    shape = (32, 32)
    expected = np.stack([_reference_paste(masks[k], boxes[k], shape) for k in range(3)])
    pasted = postprocess.paste_masks(masks, boxes, shape, threshold=0.5).numpy()
    # compare away from the 0.5 level, where float rounding may flip a pixel
    decided = np.abs(expected - 0.5) > 1e-3
    np.testing.assert_array_equal(pasted[decided], (expected >= 0.5)[decided])


def test_select_class_masks():
    probs = tf.reshape(tf.range(2 * 3 * 2 * 2 * 4, dtype=tf.float32), [2, 3, 2, 2, 4])
    class_ids = tf.constant([[1, 4, 2], [3, 3, 0]])
    chosen = postprocess.select_class_masks(probs, class_ids).numpy()
    for b in range(2):
        for d in range(3):
            channel = max(int(class_ids[b, d]) - 1, 0)
            np.testing.assert_array_equal(chosen[b, d], probs.numpy()[b, d, :, :, channel])
