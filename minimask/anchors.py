"""Anchors: the fixed reference boxes of the Region Proposal Network, and their training labels.

Faster R-CNN (Ren et al. 2015, Sec. 3.1) slides a small network over a feature map.  At
every feature-map position it looks at ``k`` fixed reference boxes, the *anchors*, of
different sizes and aspect ratios, and predicts for each one whether it holds an object and
how to move it onto that object.  With a feature pyramid (FPN, Lin et al. 2017, Sec. 4.1)
each pyramid level gets anchors of its own size: small anchors on the fine levels, large
anchors on the coarse ones.

This module holds everything about anchors that does not need a network:

* :func:`generate_anchors` lays the anchors out over an image (computed once per image shape);
* :func:`label_anchors` marks each anchor object / no object / neutral by its overlap with the
  ground-truth boxes (Faster R-CNN Sec. 3.1.2);
* :func:`sample_anchors` picks the 256 anchors per image that the loss looks at, at most half
  of them positive (Sec. 3.1.3);
* :func:`rpn_targets` encodes the box the RPN should move each positive anchor to (Eqn. 2);
* :func:`anchor_coverage` and :func:`suggest_scales` check that the anchor sizes suit a data set.

Boxes are float32 ``(y1, x1, y2, x2)`` in absolute, continuous pixels (see :mod:`minimask.boxes`).

ANCHOR ORDER (the RPN head's outputs must come out in exactly this order)
    level by level (finest stride first); within a level row-major over the feature map
    (``y``, then ``x``); within a position the ``k`` anchor shapes scale-major (for each scale,
    each ratio).  Anchor ``(y, x, a)`` of a level with a ``[Hl, Wl]`` feature map therefore sits
    at ``offset_l + (y * Wl + x) * k + a``, which is what ``reshape([B, Hl, Wl, k] -> [B, Hl*Wl*k])``
    produces (:class:`minimask.rpn.RPNHead`).
"""
import functools
import math
import numbers

import numpy as np
import tensorflow as tf

from minimask.boxes import area, encode, iou

# Anchor labels (named sentinels, as in torchvision's Matcher).
OBJECT = 1  # positive: the anchor overlaps a ground-truth object well
NO_OBJECT = -1  # negative: background
NEUTRAL = 0  # neither: excluded from the RPN loss

# FPN defaults (Lin et al. 2017, Sec. 4.1): levels P2..P6 with strides 4..64 and one anchor
# size per level, 32..512 pixels (8 x stride), with three aspect ratios.
DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SCALES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


# ---------------------------------------------------------------------------
# Generating anchors
# ---------------------------------------------------------------------------


def _normalise_scales_ratios(scales, ratios):
    """Check anchor sizes and ratios; -> (tuple of per-level tuples of floats, tuple of floats)."""
    # A bare number per level means one scale on that level: (32, 64) == ((32,), (64,)).
    scales = tuple((s,) if isinstance(s, numbers.Number) else tuple(s) for s in scales)
    if not scales or any(not level or any(s <= 0 for s in level) for level in scales):
        raise ValueError(f"every level needs at least one scale and scales must be positive, got {scales!r}")
    if len({len(level) for level in scales}) != 1:
        raise ValueError(
            "every level must have the same number of scales (the RPN head is shared over "
            f"levels), got {scales!r}"
        )
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios (height / width) must be positive, got {ratios!r}")
    return tuple(tuple(float(s) for s in level) for level in scales), ratios


def _normalise_config(image_shape, strides, scales, ratios):
    """Check the anchor configuration and turn it into hashable tuples (for the cache)."""
    if len(image_shape) != 2 or any(int(s) != s or s <= 0 for s in image_shape):
        raise ValueError(f"image_shape must be two positive integers (height, width), got {image_shape!r}")
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    strides = tuple(strides)
    if not strides or any(int(s) != s or s <= 0 for s in strides):
        raise ValueError(f"strides must be positive integers, got {strides!r}")
    strides = tuple(int(s) for s in strides)
    scales, ratios = _normalise_scales_ratios(scales, ratios)
    if len(scales) != len(strides):
        raise ValueError(
            f"need one group of scales per level: {len(strides)} strides but {len(scales)} scale groups"
        )
    return image_shape, strides, scales, ratios


def feature_shapes(image_shape, strides=DEFAULT_STRIDES):
    """Feature-map size ``(ceil(h / stride), ceil(w / stride))`` of every level, as a tuple of pairs.

    ``ceil`` is what a chain of stride-2 "same"-padded convolutions or poolings produces
    (``ceil(ceil(h / 2) / 2) == ceil(h / 4)``).  The FPN pads its input to a multiple of 32,
    so levels up to stride 32 divide exactly; stride 64 (P6, a stride-2 pooling of P5) may round up.
    """
    h, w = image_shape
    return tuple((math.ceil(h / s), math.ceil(w / s)) for s in strides)


def num_anchors_per_location(scales=DEFAULT_SCALES, ratios=DEFAULT_RATIOS):
    """Number ``k`` of anchor shapes at each feature-map position: scales per level x ratios."""
    scales, ratios = _normalise_scales_ratios(scales, ratios)
    return len(scales[0]) * len(ratios)


def anchors_per_level(image_shape, strides=DEFAULT_STRIDES, scales=DEFAULT_SCALES, ratios=DEFAULT_RATIOS):
    """Number of anchors on each level (a tuple of ints, in anchor order); they sum to ``A_total``."""
    image_shape, strides, scales, ratios = _normalise_config(image_shape, strides, scales, ratios)
    k = num_anchors_per_location(scales, ratios)
    return tuple(fh * fw * k for fh, fw in feature_shapes(image_shape, strides))


def _cell_anchors(scales, ratios):
    """The ``k`` anchor shapes of one level, centred on (0, 0): ``[k, 4]``, scale-major.

    An anchor of size ``s`` and ratio ``r = height / width`` has height ``s * sqrt(r)`` and
    width ``s / sqrt(r)``: its area is ``s**2`` whatever the ratio.
    """
    sizes = np.asarray(scales, np.float64)[:, None]  # [S, 1]
    root = np.sqrt(np.asarray(ratios, np.float64))[None, :]  # [1, R]
    heights = (sizes * root).reshape(-1)  # [S, R] -> [S*R], scale-major
    widths = (sizes / root).reshape(-1)
    return np.stack([-heights / 2, -widths / 2, heights / 2, widths / 2], axis=1)


def _level_anchors(feature_shape, stride, cell):
    """Anchors of one level: every cell anchor moved to every position -> ``[fh*fw*k, 4]``."""
    fh, fw = feature_shape
    # Feature cell i covers the pixels [i * stride, (i + 1) * stride): its centre in the
    # continuous pixel convention is (i + 0.5) * stride.
    cy = (np.arange(fh) + 0.5) * stride
    cx = (np.arange(fw) + 0.5) * stride
    cy, cx = np.meshgrid(cy, cx, indexing="ij")  # [fh, fw] each, row-major (y, then x)
    centres = np.stack([cy, cx, cy, cx], axis=-1).reshape(-1, 1, 4)  # [fh*fw, 1, 4]
    return (centres + cell[None, :, :]).reshape(-1, 4)  # [fh*fw, k, 4] -> [fh*fw*k, 4]


@functools.lru_cache(maxsize=32)
def _generate_anchors_cached(image_shape, strides, scales, ratios):
    levels = [
        _level_anchors(shape, stride, _cell_anchors(level_scales, ratios))
        for shape, stride, level_scales in zip(feature_shapes(image_shape, strides), strides, scales)
    ]
    anchors = np.concatenate(levels, axis=0).astype(np.float32)
    anchors.flags.writeable = False  # the cached array is shared by every caller
    return anchors


def generate_anchors(image_shape, strides=DEFAULT_STRIDES, scales=DEFAULT_SCALES, ratios=DEFAULT_RATIOS):
    """All anchors of an image: ``(h, w)`` -> float32 ``[A_total, 4]`` (y1, x1, y2, x2), in anchor order.

    Level ``l`` has stride ``strides[l]``, a ``ceil(h / stride) x ceil(w / stride)`` feature map
    (see :func:`feature_shapes`) and anchor sizes ``scales[l]`` in pixels (the square root of the
    anchor's area).  ``ratios`` are aspect ratios **height / width**: ratio 2 is a box twice as
    tall as wide, still of area ``size**2``.  The anchors of the feature cell ``(i, j)`` are
    centred on ``((i + 0.5) * stride, (j + 0.5) * stride)``, the centre of the pixels the cell
    covers.  Anchors near the border extend past the image; they are kept (see
    :func:`label_anchors` ``border``).

    Order: level, then feature position row-major (y, then x), then shape scale-major (each
    scale with every ratio); see the module docstring.  The result is computed once per
    configuration and cached: it is a read-only numpy array (copy it to modify it).
    """
    return _generate_anchors_cached(*_normalise_config(image_shape, strides, scales, ratios))


# ---------------------------------------------------------------------------
# Labelling, sampling and regression targets (Faster R-CNN Sec. 3.1.2 - 3.1.3)
# ---------------------------------------------------------------------------


def _batched_iou(anchors, boxes):
    """IoU of every anchor with every box of every image: ``[A, 4]``, ``[B, M, 4]`` -> ``[B, A, M]``."""
    return iou(anchors[None], boxes)  # [1, A, 4] broadcast against [B, M, 4]


def _pad_empty_axis(boxes):
    """``[B, 0, 4]`` -> ``[B, 1, 4]`` of zeros (a padding row), so that max/argmax stay defined."""
    if boxes.shape[1] == 0:
        return tf.zeros([tf.shape(boxes)[0], 1, 4], boxes.dtype)
    return boxes


def _inside_border(anchors, image_shape, border):
    """bool ``[A]``: anchors that stay within ``border`` pixels of the image."""
    h, w = float(image_shape[0]), float(image_shape[1])
    y1, x1, y2, x2 = tf.unstack(anchors, axis=-1)
    return (y1 >= -border) & (x1 >= -border) & (y2 <= h + border) & (x2 <= w + border)


def _in_ignore_region(anchors, ignore_boxes, num_ignore, threshold):
    """bool ``[B, A]``: anchors mostly (intersection / anchor area > threshold) inside a valid ignore box."""
    ignore_boxes = _pad_empty_axis(tf.convert_to_tensor(ignore_boxes, tf.float32))
    overlaps = _batched_iou(anchors, ignore_boxes)  # [B, A, G]
    anchor_area = area(anchors)[None, :, None]  # [1, A, 1]
    ignore_area = area(ignore_boxes)[:, None, :]  # [B, 1, G]
    # IoU = I / (a + g - I)  <=>  I = IoU * (a + g) / (1 + IoU): the intersection, from boxes.iou.
    intersection = overlaps * (anchor_area + ignore_area) / (1.0 + overlaps)
    inside_share = tf.math.divide_no_nan(intersection, anchor_area)  # [B, A, G]
    valid = tf.sequence_mask(num_ignore, tf.shape(ignore_boxes)[1])[:, None, :]  # [B, 1, G]
    return tf.reduce_any(valid & (inside_share > threshold), axis=2)


def label_anchors(
    anchors,
    gt_boxes,
    num_gt,
    ignore_boxes=None,
    num_ignore=None,
    positive_threshold=0.7,
    negative_threshold=0.3,
    allow_low_quality_matches=True,
    *,
    ignore_threshold=0.5,
    border=None,
    image_shape=None,
):
    """Label anchors: ``[A, 4]``, ``[B, M, 4]``, ``[B]`` -> (labels int32 ``[B, A]``, matched_gt int32 ``[B, A]``).

    Faster R-CNN Sec. 3.1.2, for every image of a padded batch (rows ``>= num_gt[b]`` of
    ``gt_boxes`` are padding and are never matched):

    * ``OBJECT`` (1) if the anchor's IoU with some ground-truth box is ``>= positive_threshold``,
      or (``allow_low_quality_matches``) if it is *a* best anchor of some ground-truth box: every
      anchor whose IoU equals that box's highest IoU counts (ties included), provided the highest
      IoU is > 0.  This gives every object at least one positive anchor.
    * ``NO_OBJECT`` (-1) if not positive and its highest IoU is ``< negative_threshold``.
    * ``NEUTRAL`` (0) otherwise: left out of the loss.

    Ignore (COCO crowd) regions ``ignore_boxes [B, G, 4]`` with ``num_ignore [B]``: an anchor that
    is not positive and whose area lies more than ``ignore_threshold`` inside an ignore box
    (intersection / anchor area, not IoU: a small anchor deep inside a large crowd has a small
    IoU but is certainly not background) becomes neutral.

    ``border``: ``None`` (default) keeps every anchor.  A number makes anchors that cross the image
    border by more than ``border`` pixels neutral and never matched; this is the Faster R-CNN
    training rule (the talk's "positive anchors that do not cross image bounds"), which needs
    ``image_shape``.  FPN implementations (Detectron2, torchvision) keep them: with small images
    and large anchors most anchors cross the border, and objects touching the border need them.

    ``matched_gt[b, a]`` is the index of the ground-truth box that anchor ``a`` overlaps most (the
    box a positive anchor regresses to; for a low-quality match too, as in Detectron2); it is
    meaningless for other anchors and 0 in images without objects, where every anchor is negative.
    """
    if not 0.0 <= negative_threshold <= positive_threshold <= 1.0:
        raise ValueError(
            "need 0 <= negative_threshold <= positive_threshold <= 1, "
            f"got negative_threshold={negative_threshold}, positive_threshold={positive_threshold}"
        )
    if (ignore_boxes is None) != (num_ignore is None):
        raise ValueError("ignore_boxes and num_ignore go together: pass both or neither")
    if border is not None and image_shape is None:
        raise ValueError("border needs image_shape (height, width) to know where the image ends")
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    if anchors.shape.rank != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be [A, 4], got shape {anchors.shape}")
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be a padded batch [B, M, 4], got shape {gt_boxes.shape}")
    gt_boxes = _pad_empty_axis(gt_boxes)
    num_gt = tf.convert_to_tensor(num_gt, tf.int32)

    overlaps = _batched_iou(anchors, gt_boxes)  # [B, A, M]
    usable = tf.sequence_mask(num_gt, tf.shape(gt_boxes)[1])[:, None, :]  # [B, 1, M]: valid rows
    if border is not None:
        inside = _inside_border(anchors, image_shape, float(border))  # [A]
        usable = usable & inside[None, :, None]  # [B, A, M]
    # Padding rows and excluded anchors get IoU -1: below every real IoU, so they never win a max.
    overlaps = tf.where(usable, overlaps, -1.0)

    best_iou = tf.reduce_max(overlaps, axis=2)  # [B, A]; -1 where the image has no object
    matched_gt = tf.argmax(overlaps, axis=2, output_type=tf.int32)  # [B, A]
    positive = best_iou >= positive_threshold
    if allow_low_quality_matches:
        best_per_gt = tf.reduce_max(overlaps, axis=1, keepdims=True)  # [B, 1, M]
        is_best = (overlaps == best_per_gt) & (best_per_gt > 0.0)  # [B, A, M], ties included
        positive = positive | tf.reduce_any(is_best, axis=2)
    negative = ~positive & (best_iou < negative_threshold)

    labels = tf.where(positive, OBJECT, tf.where(negative, NO_OBJECT, NEUTRAL))  # [B, A]
    if ignore_boxes is not None:
        num_ignore = tf.convert_to_tensor(num_ignore, tf.int32)
        crowd = _in_ignore_region(anchors, ignore_boxes, num_ignore, ignore_threshold)  # [B, A]
        labels = tf.where(crowd & ~positive, NEUTRAL, labels)
    if border is not None:
        labels = tf.where(inside[None, :], labels, NEUTRAL)
    return tf.cast(labels, tf.int32), matched_gt


def _seed_tensor(seed):
    """A stateless-RNG seed: an int -> ``[seed, 0]``; a ``[2]`` integer tensor is used as it is."""
    if isinstance(seed, numbers.Integral):
        return tf.constant([int(seed), 0], tf.int64)
    seed = tf.convert_to_tensor(seed)
    if seed.shape != (2,) or not seed.dtype.is_integer:
        raise ValueError(f"seed must be an int or an integer tensor [2], got {seed.dtype} {seed.shape}")
    return seed


def _count(mask):
    """Number of True entries per image: bool ``[B, A]`` -> int32 ``[B]``."""
    return tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)


def _random_subset(members, count, priority, k):
    """bool ``[B, A]``: ``count[b]`` random members of ``members[b]`` (``count <= k`` and <= #members).

    The members with the ``k`` highest random priorities come out of ``top_k`` in random order;
    the first ``count[b]`` of them are kept.
    """
    _, chosen = tf.math.top_k(tf.where(members, priority, -1.0), k=k)  # [B, k] anchor indices
    take = tf.range(k)[None, :] < count[:, None]  # [B, k]
    batch = tf.broadcast_to(tf.range(tf.shape(chosen)[0])[:, None], tf.shape(chosen))  # [B, k]
    indices = tf.stack([batch, chosen], axis=-1)  # [B, k, 2]
    picked = tf.scatter_nd(indices, tf.cast(take, tf.int32), tf.shape(members))  # [B, A]; indices distinct
    return picked > 0


def sample_anchors(labels, num_samples=256, positive_fraction=0.5, seed=0):
    """Random sample of the labelled anchors: int32 ``[B, A]`` -> int32 ``[B, A]``, the rest NEUTRAL.

    Faster R-CNN Sec. 3.1.3: per image up to ``int(num_samples * positive_fraction)`` positive
    anchors, and negatives to fill up to ``num_samples``: without this the loss would be ruled
    by the tens of thousands of easy background anchors.  If an image has fewer anchors of a kind,
    all of them are kept.  ``seed`` (an int, or an int tensor ``[2]`` to vary it per step inside
    ``tf.function``) drives a stateless RNG: the same seed gives the same sample.
    """
    labels = tf.convert_to_tensor(labels, tf.int32)
    if labels.shape.rank != 2 or labels.shape[1] is None:
        raise ValueError(f"labels must be [B, A] with a static A, got shape {labels.shape}")
    if num_samples < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"need num_samples >= 0 and 0 <= positive_fraction <= 1, got {num_samples}, {positive_fraction}"
        )
    k = min(int(num_samples), labels.shape[1])
    positive = labels == OBJECT
    negative = labels == NO_OBJECT
    num_positive = tf.minimum(_count(positive), int(num_samples * positive_fraction))  # [B]
    num_negative = tf.minimum(_count(negative), num_samples - num_positive)  # [B]
    # One random number per anchor; positives and negatives are disjoint, so they can share it.
    priority = tf.random.stateless_uniform(tf.shape(labels), seed=_seed_tensor(seed))
    keep_positive = _random_subset(positive, num_positive, priority, k)
    keep_negative = _random_subset(negative, num_negative, priority, k)
    return tf.where(keep_positive, OBJECT, tf.where(keep_negative, NO_OBJECT, NEUTRAL))


def rpn_targets(anchors, gt_boxes, matched_gt, labels, weights=(1.0, 1.0, 1.0, 1.0)):
    """Box targets: ``[A, 4]``, ``[B, M, 4]``, ``[B, A]``, ``[B, A]`` -> deltas ``[B, A, 4]`` (dy, dx, dh, dw).

    The deltas that move each positive anchor onto its matched ground-truth box (Faster R-CNN
    Eqn. 2, :func:`minimask.boxes.encode`); zero for every other anchor (only positives enter
    the box loss).
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes = _pad_empty_axis(tf.convert_to_tensor(gt_boxes, tf.float32))
    positive = (tf.convert_to_tensor(labels, tf.int32) == OBJECT)[..., None]  # [B, A, 1]
    matched = tf.gather(gt_boxes, tf.convert_to_tensor(matched_gt, tf.int32), batch_dims=1)  # [B, A, 4]
    references = tf.broadcast_to(anchors[None], tf.shape(matched))  # [A, 4] -> [B, A, 4]
    # Non-positive anchors may point at padding rows (say, zero boxes, whose log-size is -inf):
    # encode the anchor onto itself there, which is exactly zero, instead of a row of garbage.
    targets = tf.where(positive, matched, references)
    return tf.where(positive, encode(targets, references, weights), 0.0)


# ---------------------------------------------------------------------------
# Diagnostics: do the anchors suit the data?
# ---------------------------------------------------------------------------


def _all_boxes(boxes):
    """A list of ``[N_i, 4]`` arrays or one ``[N, 4]`` array -> one float32 ``[N, 4]`` array."""
    if isinstance(boxes, (list, tuple)):
        boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
        boxes = np.concatenate(boxes, axis=0) if boxes else np.zeros((0, 4), np.float32)
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] or a list of [N_i, 4] arrays, got shape {boxes.shape}")
    if len(boxes) == 0:
        raise ValueError("no boxes given: anchor coverage needs at least one ground-truth box")
    return boxes


def _box_sizes(boxes):
    """Size ``sqrt(area)`` of ``[N, 4]`` boxes, the same measure as the anchor scales -> ``[N]``."""
    return np.sqrt(area(boxes).numpy())


def anchor_coverage(
    boxes,
    image_shape,
    strides=DEFAULT_STRIDES,
    scales=DEFAULT_SCALES,
    ratios=DEFAULT_RATIOS,
    positive_threshold=0.7,
    size_edges=(32.0, 96.0),
):
    """How well the anchors fit a data set's boxes (``[N, 4]`` or a list of ``[N_i, 4]``) -> dict.

    For every ground-truth box, the best IoU any anchor of an ``image_shape`` image reaches.  A box
    with no anchor at ``>= positive_threshold`` only gets the "low-quality" best-match positives
    of :func:`label_anchors`: if that is common, the anchor scales or ratios do not suit the data
    (see :func:`suggest_scales`).  The result holds

    * ``"best_iou"`` float32 ``[N]`` (for a histogram) and ``"sizes"`` ``[N]`` (sqrt of box area);
    * ``"uncovered_share"``: share of boxes whose best IoU is below ``positive_threshold``;
    * ``"buckets"``: a list, per size range set by ``size_edges`` (default COCO's small / medium
      / large, 32 and 96 pixels), of dicts with ``name``, ``min_size``, ``max_size``, ``count``,
      ``uncovered_share`` and ``mean_best_iou`` (both ``None`` for an empty bucket).

    Runs on numpy outside the model; boxes are processed in chunks to bound memory.
    """
    boxes = _all_boxes(boxes)
    anchors = generate_anchors(image_shape, strides, scales, ratios)
    chunk = max(1, 4_000_000 // len(anchors))  # an [A, chunk] IoU block of ~16 MB
    best_iou = np.concatenate(
        [iou(anchors, boxes[i : i + chunk]).numpy().max(axis=0) for i in range(0, len(boxes), chunk)]
    )
    sizes = _box_sizes(boxes)
    uncovered = best_iou < positive_threshold
    edges = [0.0, *sorted(float(e) for e in size_edges), math.inf]
    buckets = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (sizes >= low) & (sizes < high)
        count = int(inside.sum())
        buckets.append(
            {
                "name": f"[{low:g}, {high:g})",
                "min_size": low,
                "max_size": high,
                "count": count,
                "uncovered_share": float(uncovered[inside].mean()) if count else None,
                "mean_best_iou": float(best_iou[inside].mean()) if count else None,
            }
        )
    return {
        "best_iou": best_iou.astype(np.float32),
        "sizes": sizes.astype(np.float32),
        "uncovered_share": float(uncovered.mean()),
        "positive_threshold": positive_threshold,
        "buckets": buckets,
    }


def suggest_scales(boxes, strides=DEFAULT_STRIDES, scales_per_level=1, size_per_stride=8.0):
    """Anchor sizes fitted to a data set's boxes (``[N, 4]`` or a list) -> scales, one tuple per level.

    FPN (Lin et al. 2017, Sec. 4.1) gives the level of stride ``t`` anchors of size
    ``size_per_stride * t`` (8 x stride: 32 pixels at stride 4).  Here each level keeps that
    responsibility, one octave of box sizes ``[8t / sqrt(2), 8t * sqrt(2))`` (the finest level also
    takes every smaller box, the coarsest every larger one), but its ``scales_per_level`` sizes
    are the quantiles ``(j + 0.5) / scales_per_level`` of the sizes ``sqrt(area)`` of the boxes
    that fall in its range: the anchors follow the data, snapped to the level that suits them.
    A level that receives no box keeps the FPN ladder ``8t * 2**(j / scales_per_level)``.
    Sizes are rounded to 0.1 pixel.

    This is a heuristic: check the suggestion with :func:`anchor_coverage`.  A box much smaller
    than about 4 x the finest stride cannot reach IoU 0.7 with anchors that far apart, whatever
    their size: use a finer stride then.
    """
    sizes = np.sort(_box_sizes(_all_boxes(boxes)))
    strides = tuple(strides)
    if scales_per_level < 1:
        raise ValueError(f"scales_per_level must be >= 1, got {scales_per_level}")
    centres = [size_per_stride * t for t in strides]
    # Level boundaries: the geometric midpoints between neighbouring levels' default sizes.
    bounds = [0.0] + [math.sqrt(a * b) for a, b in zip(centres[:-1], centres[1:])] + [math.inf]
    quantiles = (np.arange(scales_per_level) + 0.5) / scales_per_level
    suggestion = []
    for centre, low, high in zip(centres, bounds[:-1], bounds[1:]):
        mine = sizes[(sizes >= low) & (sizes < high)]
        if len(mine):
            level = np.quantile(mine, quantiles)
        else:
            level = centre * 2.0 ** (np.arange(scales_per_level) / scales_per_level)
        suggestion.append(tuple(round(float(s), 1) for s in level))
    return tuple(suggestion)
