"""Proposals: from RPN outputs to a fixed number of candidate object boxes per image.

Faster R-CNN (Ren et al. 2015, Sec. 3.3) and the talk's "proposal layer":

1. keep the ``pre_nms_top_n`` anchors with the highest objectness;
2. apply their predicted deltas (:func:`minimask.boxes.decode`);
3. clip the boxes to the image and drop tiny ones;
4. non-maximum suppression (NMS): go down the list by score, reject every box that overlaps
   an already kept, better-scored box by IoU > ``nms_threshold``;
5. keep the best ``post_nms_top_n``.

The output has a fixed size, padded, with an explicit count of valid rows.

:func:`nms` is greedy NMS written from scratch (vectorised IoU, one ``tf.while_loop`` step per
kept box) and returns exactly the indices of ``tf.image.non_max_suppression``.  The proposal
layer nevertheless calls TensorFlow's C++ kernel, which is much faster on CPU.  Measured with
``python -m bench.bench_rpn`` (6,000 boxes, IoU 0.7, at most 1,000 kept, inside ``tf.function``,
median of 10; three runs on 2 CPU cores shared with other jobs, hence the ranges; the latest
run is in ``bench/results/rpn.json``):

=====================================================  ===========
implementation                                         median ms
=====================================================  ===========
:func:`nms`, graph mode                                270 - 650
:func:`nms`, compiled with XLA (``jit_compile=True``)  17 - 41
``tf.image.non_max_suppression``                       7 - 15
``tf.image.non_max_suppression_padded``                13 - 17
:func:`nms_padded`, batch of 2, built-in back-end      23 - 110
:func:`nms_padded`, batch of 2, greedy-loop back-end   410 - 910
=====================================================  ===========

Hence :func:`nms_padded` (and so :func:`propose`) runs ``tf.image.non_max_suppression`` per
image and pads the result itself.  ``tf.image.non_max_suppression_padded`` is slower here and
has a trap: its ``score_threshold`` multiplies the scores by a 0/1 mask, which turns ``-inf``
into NaN and ranks the masked (zeroed) boxes above negative logits, while with the default
threshold it keeps ``-inf`` scores that ``tf.image.non_max_suppression`` drops.
"""
import collections

import keras
import numpy as np
import tensorflow as tf

from minimask.boxes import clip, decode, iou

# The result of :func:`nms_padded`: indices int32 [B, K] into the input (0 past the count),
# boxes [B, K, 4] and scores [B, K] of the kept entries (0 past the count), num_kept int32 [B].
NMSResult = collections.namedtuple("NMSResult", ["indices", "boxes", "scores", "num_kept"])


def _check_max_output_size(max_output_size):
    is_int = isinstance(max_output_size, (int, np.integer)) and not isinstance(max_output_size, bool)
    if not is_int or max_output_size < 0:
        raise ValueError(
            f"max_output_size must be a non-negative Python int (a static size), got {max_output_size!r}"
        )
    return int(max_output_size)


def _greedy_nms(boxes, scores, active, iou_threshold, max_output_size):
    """Greedy NMS of one image: ``[N, 4]``, ``[N]``, bool ``[N]`` -> (kept indices int32 ``[count]``, count).

    Indices into the input, best score first.  Only ``active`` entries may be kept.  Each step
    computes the IoU row of the box it keeps, instead of the full ``N x N`` IoU matrix up front:
    at most ``max_output_size`` rows of ``N`` (for 6,000 boxes the matrix would be 144 MB).
    """
    num_boxes = tf.shape(boxes)[0]
    # Inactive entries sort last; this also keeps NaN scores from scrambling the sort.
    scores = tf.where(active, scores, -np.inf)
    order = tf.argsort(scores, direction="DESCENDING", stable=True)  # [N] best first
    sorted_boxes = tf.gather(boxes, order)  # [N, 4]
    active = tf.gather(active, order)  # [N]: not yet kept, not yet suppressed
    positions = tf.range(num_boxes)

    def keep_next(count, active, kept):
        # The best-scored active box is the first active position in sorted order.
        best = tf.reduce_min(tf.where(active, positions, num_boxes))
        overlap = iou(sorted_boxes[best][None, :], sorted_boxes)[0]  # [1, 4] vs [N, 4] -> [N]
        # Suppress what overlaps it too much (IoU > threshold, as TensorFlow), and itself.
        active = active & (overlap <= iou_threshold) & (positions != best)
        return count + 1, active, kept.write(count, best)

    def not_done(count, active, kept):
        return (count < max_output_size) & tf.reduce_any(active)

    # A fixed-size array (XLA cannot compile a growing one); entries past the count stay 0.
    kept = tf.TensorArray(tf.int32, size=max_output_size, element_shape=[])
    count, _, kept = tf.while_loop(not_done, keep_next, (tf.constant(0), active, kept))
    return tf.gather(order, kept.stack()[:count]), count  # sorted positions -> input indices


def nms(boxes, scores, iou_threshold=0.7, max_output_size=None):
    """Greedy NMS: boxes ``[N, 4]`` (y1, x1, y2, x2), scores ``[N]`` -> kept indices int32 ``[<= max_output_size]``.

    Indices are best score first.  A box is dropped if its IoU with a kept, better-scored box is
    ``> iou_threshold``; boxes with score ``-inf`` (or NaN) are never kept.  Same result as
    ``tf.image.non_max_suppression(boxes, scores, max_output_size, iou_threshold)``; equal scores
    are taken in index order.  ``max_output_size`` defaults to ``N`` (which must then be static).
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    if boxes.shape.rank != 2 or boxes.shape[-1] != 4 or scores.shape.rank != 1:
        raise ValueError(f"nms expects boxes [N, 4] and scores [N], got {boxes.shape} and {scores.shape}")
    if max_output_size is None:
        max_output_size = boxes.shape[0]
    max_output_size = _check_max_output_size(max_output_size)
    indices, _ = _greedy_nms(boxes, scores, scores > -np.inf, iou_threshold, max_output_size)
    return indices


def _valid_mask(valid, scores):
    """``valid``: None (all), a count per image ``[B]`` or a mask ``[B, N]`` -> bool ``[B, N]``."""
    if valid is None:
        return tf.ones_like(scores, tf.bool)
    valid = tf.convert_to_tensor(valid)
    if valid.shape.rank == 1:
        return tf.sequence_mask(valid, tf.shape(scores)[1])
    if valid.shape.rank != 2 or valid.dtype != tf.bool:
        raise ValueError(f"valid must be a bool mask [B, N] or counts [B], got {valid.dtype} {valid.shape}")
    return valid


def _pad_to(indices, count, size):
    """``[count]`` -> ``[size]`` with zeros after the count."""
    return tf.ensure_shape(tf.pad(indices, [[0, size - count]]), [size])


def nms_padded(boxes, scores, valid=None, iou_threshold=0.7, max_output_size=100, use_builtin=True):
    """Batched, padded NMS: ``[B, N, 4]``, ``[B, N]``, valid bool ``[B, N]`` or counts ``[B]`` -> :data:`NMSResult`.

    Per image, the same rule as :func:`nms` over the valid entries; the result has a fixed size
    ``K = max_output_size``: ``indices [B, K]``, ``boxes [B, K, 4]``, ``scores [B, K]`` (rows past
    ``num_kept [B]`` are 0).  ``use_builtin`` picks ``tf.image.non_max_suppression`` (the faster
    one, see the module docstring) or :func:`nms`'s loop; the results are the same.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    scores = tf.convert_to_tensor(scores, tf.float32)
    if boxes.shape.rank != 3 or boxes.shape[-1] != 4 or scores.shape.rank != 2:
        raise ValueError(
            f"nms_padded expects boxes [B, N, 4] and scores [B, N], got {boxes.shape} and {scores.shape}"
        )
    size = _check_max_output_size(max_output_size)
    active = _valid_mask(valid, scores) & (scores > -np.inf)  # [B, N]
    if boxes.shape[1] == 0 or size == 0:  # nothing to choose from (or nothing wanted)
        batch = tf.shape(boxes)[0]
        return NMSResult(
            tf.zeros([batch, size], tf.int32), tf.zeros([batch, size, 4]), tf.zeros([batch, size]),
            tf.zeros([batch], tf.int32),
        )

    def one_image(args):
        image_boxes, image_scores, image_active = args  # [N, 4], [N], [N]
        if use_builtin:
            # -inf scores are never kept by tf.image.non_max_suppression: that is how invalid
            # entries are left out.
            scores_or_minus_inf = tf.where(image_active, image_scores, -np.inf)
            indices = tf.image.non_max_suppression(image_boxes, scores_or_minus_inf, size, iou_threshold)
        else:
            indices, _ = _greedy_nms(image_boxes, image_scores, image_active, iou_threshold, size)
        count = tf.shape(indices)[0]
        return _pad_to(indices, count, size), count

    signature = (tf.TensorSpec([size], tf.int32), tf.TensorSpec([], tf.int32))
    # One image at a time: [B, N, 4], [B, N], [B, N] -> [B, K], [B]
    indices, num_kept = tf.map_fn(one_image, (boxes, scores, active), fn_output_signature=signature)
    kept = tf.range(size)[None, :] < num_kept[:, None]  # [B, K]
    indices = tf.where(kept, indices, 0)
    kept_boxes = tf.where(kept[..., None], tf.gather(boxes, indices, batch_dims=1), 0.0)  # [B, K, 4]
    kept_scores = tf.where(kept, tf.gather(scores, indices, batch_dims=1), 0.0)  # [B, K]
    return NMSResult(indices, kept_boxes, kept_scores, num_kept)


def _top_candidates(objectness, top_n, anchors_per_level):
    """Indices ``[B, K]`` of the best-scored anchors: ``top_n`` overall, or ``top_n`` per level."""
    if anchors_per_level is None:
        return tf.math.top_k(objectness, k=min(top_n, objectness.shape[1])).indices  # [B, K]
    if sum(anchors_per_level) != objectness.shape[1]:
        raise ValueError(
            f"anchors_per_level {tuple(anchors_per_level)} do not add up to A = {objectness.shape[1]}"
        )
    candidates, offset = [], 0
    for level, count in zip(tf.split(objectness, list(anchors_per_level), axis=1), anchors_per_level):
        if count:
            best = tf.math.top_k(level, k=min(top_n, count)).indices  # [B, k_l], indices within the level
            candidates.append(best + offset)
        offset += count
    return tf.concat(candidates, axis=1)  # [B, sum_l k_l]


def propose(
    objectness,
    deltas,
    anchors,
    image_shape,
    pre_nms_top_n=1000,
    post_nms_top_n=1000,
    nms_threshold=0.7,
    min_size=0.0,
    weights=(1.0, 1.0, 1.0, 1.0),
    anchors_per_level=None,
):
    """Proposals: ``[B, A]``, ``[B, A, 4]``, ``[A, 4]`` -> (boxes ``[B, P, 4]``, scores ``[B, P]``, count ``[B]``).

    Inputs: the RPN's objectness logits and deltas, and the anchors (y1, x1, y2, x2).  Outputs,
    ``P = post_nms_top_n`` rows per image, best first: boxes (y1, x1, y2, x2) in the pixels of
    the ``(height, width)`` image, their objectness logits (``sigmoid`` gives the probability),
    and ``num_proposals``, the number of valid rows.  Rows past ``num_proposals`` are 0.

    Steps (module docstring): the ``pre_nms_top_n`` best anchors, counted per level when
    ``anchors_per_level`` (:func:`minimask.anchors.anchors_per_level`) is given, as Detectron2
    does for FPN so that the fine levels with most anchors cannot crowd out the coarse ones, else
    over all anchors; decode with ``weights``; clip to the image; drop boxes whose clipped height
    or width is ``<= min_size`` (so ``min_size = 0`` drops only empty boxes, such as boxes
    entirely outside the image) and boxes whose score is ``-inf``; NMS at ``nms_threshold``
    (one NMS over all levels, as in the talk; Detectron2 runs it per level); the best
    ``post_nms_top_n``.  When nothing survives, ``num_proposals`` is 0.
    """
    objectness = tf.convert_to_tensor(objectness, tf.float32)
    deltas = tf.convert_to_tensor(deltas, tf.float32)
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    if objectness.shape.rank != 2 or objectness.shape[1] is None:
        raise ValueError(f"objectness must be [B, A] with a static A, got {objectness.shape}")
    if deltas.shape[1:] != (objectness.shape[1], 4) or anchors.shape != (objectness.shape[1], 4):
        raise ValueError(
            f"expected deltas [B, A, 4] and anchors [A, 4] with A = {objectness.shape[1]}, "
            f"got {deltas.shape} and {anchors.shape}"
        )
    if pre_nms_top_n < 1 or post_nms_top_n < 1:
        raise ValueError(
            f"pre_nms_top_n and post_nms_top_n must be >= 1, got {pre_nms_top_n}, {post_nms_top_n}"
        )
    height, width = image_shape[0], image_shape[1]

    candidates = _top_candidates(objectness, pre_nms_top_n, anchors_per_level)  # [B, K]
    scores = tf.gather(objectness, candidates, batch_dims=1)  # [B, K]
    candidate_deltas = tf.gather(deltas, candidates, batch_dims=1)  # [B, K, 4]
    candidate_anchors = tf.gather(anchors, candidates)  # [B, K, 4]
    boxes = clip(decode(candidate_deltas, candidate_anchors, weights), height, width)  # [B, K, 4]

    box_height = boxes[..., 2] - boxes[..., 0]
    box_width = boxes[..., 3] - boxes[..., 1]
    valid = (box_height > min_size) & (box_width > min_size) & (scores > -np.inf)  # [B, K]
    result = nms_padded(boxes, scores, valid, nms_threshold, int(post_nms_top_n))
    return result.boxes, result.scores, result.num_kept


@keras.saving.register_keras_serializable(package="minimask")
class ProposalLayer(keras.layers.Layer):
    """Keras wrapper of :func:`propose`, with separate proposal counts for training and inference.

    ``call(objectness [B, A], deltas [B, A, 4], anchors [A, 4], *, image_shape, anchors_per_level=None,
    training=False)`` -> (boxes ``[B, P, 4]``, scores ``[B, P]``, num_proposals ``[B]``), where ``P``
    is ``post_nms_top_n_train`` when training and ``post_nms_top_n_inference`` otherwise.
    Defaults are Detectron2's for FPN (pre-NMS counts are per level when ``anchors_per_level``
    is given).  ``delta_weights`` are :func:`propose`'s ``weights`` (``weights`` is a Keras
    layer attribute).  ``image_shape`` and ``anchors_per_level`` are keyword arguments (Keras
    accepts only tensors as positional arguments); ``training`` is a Python bool.  The layer has
    no trainable weights.
    """

    def __init__(
        self,
        pre_nms_top_n_train=2000,
        post_nms_top_n_train=1000,
        pre_nms_top_n_inference=1000,
        post_nms_top_n_inference=1000,
        nms_threshold=0.7,
        min_size=0.0,
        delta_weights=(1.0, 1.0, 1.0, 1.0),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pre_nms_top_n_train = int(pre_nms_top_n_train)
        self.post_nms_top_n_train = int(post_nms_top_n_train)
        self.pre_nms_top_n_inference = int(pre_nms_top_n_inference)
        self.post_nms_top_n_inference = int(post_nms_top_n_inference)
        self.nms_threshold = float(nms_threshold)
        self.min_size = float(min_size)
        self.delta_weights = tuple(float(w) for w in delta_weights)

    def call(self, objectness, deltas, anchors, *, image_shape, anchors_per_level=None, training=False):
        pre_n, post_n = (
            (self.pre_nms_top_n_train, self.post_nms_top_n_train)
            if training
            else (self.pre_nms_top_n_inference, self.post_nms_top_n_inference)
        )
        return propose(
            objectness,
            deltas,
            anchors,
            image_shape,
            pre_nms_top_n=pre_n,
            post_nms_top_n=post_n,
            nms_threshold=self.nms_threshold,
            min_size=self.min_size,
            weights=self.delta_weights,
            anchors_per_level=anchors_per_level,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            pre_nms_top_n_train=self.pre_nms_top_n_train,
            post_nms_top_n_train=self.post_nms_top_n_train,
            pre_nms_top_n_inference=self.pre_nms_top_n_inference,
            post_nms_top_n_inference=self.post_nms_top_n_inference,
            nms_threshold=self.nms_threshold,
            min_size=self.min_size,
            delta_weights=list(self.delta_weights),
        )
        return config
