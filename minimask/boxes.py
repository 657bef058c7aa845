"""Boxes: the one convention of minimask, and the box arithmetic built on it.

CONVENTIONS (every module of minimask and every lesson follows them)
--------------------------------------------------------------------
Boxes
    float32 ``[..., 4]`` as ``(y1, x1, y2, x2)`` in absolute pixel coordinates of
    the image the boxes belong to. Coordinates are *continuous*: pixel ``(i, j)``
    covers ``[i, i+1) x [j, j+1)``, so a box around the single pixel ``(3, 5)`` is
    ``(3, 5, 4, 6)`` and has height 1, width 1 and area 1.  ``y2 - y1`` is the
    height, ``x2 - x1`` the width; a valid box has ``y2 > y1`` and ``x2 > x1``.
COCO boxes
    ``[x, y, w, h]`` with the same continuous pixels (``x = x1``, ``w = x2 - x1``).
    They appear only at the I/O boundary and are converted by
    :func:`coco_xywh_to_yxyx` and :func:`yxyx_to_coco_xywh`.
Box deltas
    float32 ``[..., 4]`` in the order ``(dy, dx, dh, dw)`` (the same order as the
    boxes): centre offsets scaled by the reference box size, and log size ratios,
    each multiplied by a per-coordinate weight (R-CNN, Girshick et al. 2014,
    Appendix C; Faster R-CNN Eqn. 2).  See :func:`encode` and :func:`decode`.
Class ids
    int32; ``0`` is background ("no object"), ``1..K`` are the object classes.
    Category names travel alongside as a list where ``names[k]`` names class ``k``
    (``names[0] == "background"``).
Instance masks
    bool ``[N, H, W]`` at image resolution, one per instance, in the order of the boxes.
A sample
    ``{"image": uint8 [H, W, 3], "boxes": float32 [N, 4], "class_ids": int32 [N],
    "masks": bool [N, H, W]}``, optionally ``"ignore_boxes": float32 [G, 4]`` for
    crowd regions that are neither object nor background.
A batch
    the sample's keys padded along the instance axis to a fixed ``M``, plus
    ``"num_instances": int32 [B]`` (and ``"num_ignore": int32 [B]``): the explicit
    count of valid rows.  Rows past the count are padding and carry no meaning,
    whatever their value; never test ``boxes == 0`` to find them.

The functions below are TensorFlow ops (they accept numpy arrays too), except the
COCO and mask conversions at the end, which run on numpy at the I/O boundary.
"""
import math

import numpy as np
import tensorflow as tf

# exp() of a predicted log-size delta is clamped at this value so that a wild
# prediction cannot overflow (a box at most 1000/16 times its anchor; Detectron2).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes):
    """Area of ``boxes [..., 4]`` (y1, x1, y2, x2) -> ``[...]``; empty boxes give 0."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    return tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)


def iou(boxes_a, boxes_b):
    """Pairwise intersection over union: ``[..., N, 4]``, ``[..., M, 4]`` -> ``[..., N, M]``.

    Boxes are (y1, x1, y2, x2).  Leading dimensions broadcast, so ``[N, 4], [M, 4]`` gives
    ``[N, M]`` and a batch ``[B, N, 4], [B, M, 4]`` gives ``[B, N, M]``.  A pair whose union is
    empty (two empty boxes) has IoU 0.
    """
    a = tf.convert_to_tensor(boxes_a, tf.float32)
    b = tf.convert_to_tensor(boxes_b, tf.float32)
    # [..., N, 1, 4] against [..., 1, M, 4] broadcasts to every pair.
    top_left = tf.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = tf.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    size = tf.maximum(bottom_right - top_left, 0.0)
    intersection = size[..., 0] * size[..., 1]
    union = area(a)[..., :, None] + area(b)[..., None, :] - intersection
    return tf.math.divide_no_nan(intersection, union)


def _centre_size(boxes):
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    return (y1 + y2) * 0.5, (x1 + x2) * 0.5, y2 - y1, x2 - x1


def encode(boxes, reference, weights=(1.0, 1.0, 1.0, 1.0)):
    """Deltas that move ``reference`` boxes onto ``boxes``; both ``[..., 4]`` -> ``[..., 4]``.

    (dy, dx, dh, dw) = weights * ((cy - cy_r) / h_r, (cx - cx_r) / w_r, log(h / h_r), log(w / w_r)).
    Reference boxes must have positive size; target boxes too (log of 0 is -inf).
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    reference = tf.convert_to_tensor(reference, tf.float32)
    cy, cx, h, w = _centre_size(boxes)
    rcy, rcx, rh, rw = _centre_size(reference)
    wy, wx, wh, ww = weights
    return tf.stack(
        [
            wy * (cy - rcy) / rh,
            wx * (cx - rcx) / rw,
            wh * tf.math.log(h / rh),
            ww * tf.math.log(w / rw),
        ],
        axis=-1,
    )


def decode(deltas, reference, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp=DEFAULT_SCALE_CLAMP):
    """Apply ``deltas [..., 4]`` (dy, dx, dh, dw) to ``reference [..., 4]`` -> boxes ``[..., 4]``.

    The inverse of :func:`encode`.  The log-size deltas are clamped at ``scale_clamp``
    before ``exp`` so a wild prediction gives a large box, never inf or NaN.
    """
    deltas = tf.convert_to_tensor(deltas, tf.float32)
    reference = tf.convert_to_tensor(reference, tf.float32)
    rcy, rcx, rh, rw = _centre_size(reference)
    wy, wx, wh, ww = weights
    dy, dx, dh, dw = tf.unstack(deltas, axis=-1)
    cy = rcy + (dy / wy) * rh
    cx = rcx + (dx / wx) * rw
    h = rh * tf.exp(tf.minimum(dh / wh, scale_clamp))
    w = rw * tf.exp(tf.minimum(dw / ww, scale_clamp))
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def smooth_l1(x, beta=1.0):
    """Smooth L1 (Fast R-CNN Eqn. 3), elementwise: ``0.5 x**2 / beta`` if ``|x| < beta``, else
    ``|x| - beta / 2``; ``beta = 0`` is plain L1.  The box-regression loss of the RPN and the box head."""
    x = tf.abs(tf.convert_to_tensor(x, tf.float32))
    if beta <= 0.0:
        return x  # also avoids 0 / 0 in the unused branch, whose gradient would be NaN
    return tf.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def clip(boxes, height, width):
    """Clip ``boxes [..., 4]`` to the image ``[0, height] x [0, width]``."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    return tf.stack(
        [
            tf.clip_by_value(y1, 0.0, height),
            tf.clip_by_value(x1, 0.0, width),
            tf.clip_by_value(y2, 0.0, height),
            tf.clip_by_value(x2, 0.0, width),
        ],
        axis=-1,
    )


# ---------------------------------------------------------------------------
# The I/O boundary (numpy): COCO boxes and boxes of masks.
# ---------------------------------------------------------------------------


def coco_xywh_to_yxyx(xywh):
    """COCO ``[..., 4]`` (x, y, w, h) -> minimask ``[..., 4]`` (y1, x1, y2, x2), float32."""
    xywh = np.asarray(xywh, np.float32).reshape(np.shape(xywh))
    x, y, w, h = np.moveaxis(xywh, -1, 0)
    return np.stack([y, x, y + h, x + w], axis=-1).astype(np.float32)


def yxyx_to_coco_xywh(boxes):
    """minimask ``[..., 4]`` (y1, x1, y2, x2) -> COCO ``[..., 4]`` (x, y, w, h), float32."""
    boxes = np.asarray(boxes, np.float32)
    y1, x1, y2, x2 = np.moveaxis(boxes, -1, 0)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=-1).astype(np.float32)


def boxes_from_masks(masks):
    """Tight boxes of instance masks: bool ``[N, H, W]`` -> float32 ``[N, 4]`` (y1, x1, y2, x2).

    A mask whose pixels span rows ``r0..r1`` and columns ``c0..c1`` gets the box
    ``(r0, c0, r1 + 1, c1 + 1)``.  An empty mask gets ``(0, 0, 0, 0)``: check for empty
    masks before calling if that matters.
    """
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    has = rows.any(axis=1)
    y1 = np.argmax(rows, axis=1)
    y2 = h - np.argmax(rows[:, ::-1], axis=1)
    x1 = np.argmax(cols, axis=1)
    x2 = w - np.argmax(cols[:, ::-1], axis=1)
    boxes = np.stack([y1, x1, y2, x2], axis=1).astype(np.float32)
    boxes[~has] = 0.0
    return boxes.reshape(n, 4)
