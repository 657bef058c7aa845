"""Training targets of the RoI heads: sample RoIs from the proposals and label them.

For every image, in training only:

1. Candidates = the RPN proposals plus the valid ground-truth boxes themselves, so that the
   heads always see some perfect positives early in training (Detectron2's
   ``add_ground_truth_to_proposals``; the Mask R-CNN recipe).
2. Match: each candidate's IoU with every valid ground-truth box; its best match.
   Positive (an object) if the best IoU is ``>= positive_iou``; background if it is in
   ``[negative_iou_low, negative_iou_high)`` (Fast R-CNN, Girshick 2015, Sec. 2.3:
   "IoU in [0.1, 0.5)"; Mask R-CNN Sec. 3.1 uses 0.5 and no lower bound).
3. Sample a fixed ``num_rois`` per image, at most ``positive_fraction`` of them positive
   (Fast R-CNN Sec. 2.3: 25 %), uniformly at random without replacement, the rest
   background.  If an image has too few candidates, the remaining slots are padding
   (``roi_valid`` False).
4. Targets (Mask R-CNN Sec. 3.1): the class of the matched object (0 for background); the box
   deltas (:func:`minimask.boxes.encode`) from the RoI to its object, for positives only; and
   the mask target, "the intersection between an RoI and its associated ground-truth mask":
   the object's mask cut out along the RoI and resized to ``mask_size x mask_size`` with
   :func:`minimask.roi_align.roi_align`, then binarized at 0.5.  Only positives get one.

Everything is batched, vectorized and static-shaped (works inside ``tf.function``).  The
random sampling is stateless: the same ``seed`` gives the same RoIs.
"""
import tensorflow as tf

from minimask.boxes import encode, iou
from minimask.roi_align import roi_align

# ``matched_gt`` of a RoI that is not positive (background or padding).
NO_MATCH = -1


def _as_seed(seed):
    """An int or an int ``[2]`` tensor -> the ``[2]`` seed of the stateless random ops."""
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.shape != (2,) or not seed.dtype.is_integer:
        raise ValueError(f"seed must be an int or an integer tensor of shape [2], got {seed!r}")
    return seed


def _check_thresholds(positive_fraction, positive_iou, negative_iou_high, negative_iou_low):
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if not 0.0 <= negative_iou_low <= negative_iou_high <= positive_iou <= 1.0:
        raise ValueError(
            "need 0 <= negative_iou_low <= negative_iou_high <= positive_iou <= 1, got "
            f"{negative_iou_low}, {negative_iou_high}, {positive_iou}"
        )


def candidate_boxes(proposals, num_proposals, gt_boxes, num_gt):
    """Proposals ``[B, P, 4]`` and ground truth ``[B, M, 4]`` (y1, x1, y2, x2, pixels), each with
    a valid count ``[B]`` -> candidates ``[B, P + M, 4]``, their validity bool ``[B, P + M]``."""
    boxes = tf.concat([proposals, gt_boxes], axis=1)  # [B, P + M, 4]
    valid = tf.concat(
        [
            tf.sequence_mask(num_proposals, tf.shape(proposals)[1]),  # [B, P]
            tf.sequence_mask(num_gt, tf.shape(gt_boxes)[1]),  # [B, M]
        ],
        axis=1,
    )
    return boxes, valid


def match_to_gt(candidates, gt_boxes, gt_valid):
    """Best ground truth of each candidate: ``[B, N, 4]``, ``[B, M, 4]``, gt validity ``[B, M]``
    -> (index int32 ``[B, N]``, IoU ``[B, N]``).  Without any valid gt the IoU is 0 (index 0)."""
    overlaps = iou(candidates, gt_boxes)  # [B, N, 4], [B, M, 4] -> [B, N, M]
    # padding gt columns get -1 so that they are never anyone's best match.
    overlaps = tf.where(gt_valid[:, None, :], overlaps, -1.0)
    best_iou = tf.maximum(tf.reduce_max(overlaps, axis=2), 0.0)  # [B, N]
    best_gt = tf.argmax(overlaps, axis=2, output_type=tf.int32)  # [B, N]
    return best_gt, best_iou


def sample_rois(positive, negative, num_rois, positive_fraction, seed):
    """Pick ``num_rois`` candidates per image: bool ``positive, negative [B, N]`` ->
    (index int32 ``[B, R]`` into the candidates, valid bool ``[B, R]``, positive bool ``[B, R]``).

    Up to ``int(num_rois * positive_fraction)`` positives, then negatives; both chosen
    uniformly at random (random keys + top_k: the candidates with the largest keys win).
    Positives come first in the output.  Slots left over are invalid (their index is 0).
    """
    max_positive = int(num_rois * positive_fraction)
    batch = tf.shape(positive)[0]
    keys = tf.random.stateless_uniform(tf.shape(positive), seed)  # [B, N] in [0, 1)
    # Ineligible candidates get key -1; num_rois extra -1 columns make top_k always possible.
    padding = tf.fill([batch, num_rois], -1.0)
    positive_keys = tf.concat([tf.where(positive, keys, -1.0), padding], axis=1)  # [B, N + R]
    negative_keys = tf.concat([tf.where(negative, keys, -1.0), padding], axis=1)
    top_positive = tf.math.top_k(positive_keys, k=max(max_positive, 1))  # [B, max(Pmax, 1)]
    top_negative = tf.math.top_k(negative_keys, k=num_rois)  # [B, R]

    num_positive = tf.minimum(
        tf.reduce_sum(tf.cast(top_positive.values >= 0.0, tf.int32), axis=1), max_positive)  # [B]
    num_negative = tf.minimum(
        tf.reduce_sum(tf.cast(top_negative.values >= 0.0, tf.int32), axis=1),
        num_rois - num_positive)  # [B]

    # Slot s takes the s-th chosen positive, or else the (s - num_positive)-th negative.
    slot = tf.range(num_rois)[None, :]  # [1, R]
    is_positive = slot < num_positive[:, None]  # [B, R]
    positive_slot = tf.broadcast_to(tf.minimum(slot, max(max_positive, 1) - 1),
                                    tf.shape(is_positive))  # [B, R]
    negative_slot = tf.maximum(slot - num_positive[:, None], 0)  # [B, R]
    index = tf.where(
        is_positive,
        tf.gather(top_positive.indices, positive_slot, batch_dims=1),
        tf.gather(top_negative.indices, negative_slot, batch_dims=1),
    )
    valid = slot < (num_positive + num_negative)[:, None]
    return tf.where(valid, index, 0), valid, is_positive


def crop_rois(maps, rois, map_index, size, implementation="gather"):
    """Cut every RoI out of full-resolution maps: maps ``[N, H, W, C]`` (image pixels), RoIs
    ``[B, R, 4]`` (y1, x1, y2, x2), ``map_index`` int32 ``[B, R]`` (the map of each RoI)
    -> float32 ``[B, R, size, size, C]``.

    RoIAlign at stride 1 (2 x 2 bilinear samples per cell, aligned).  The mask targets and the
    pixels that the mask head may see (``MaskRCNN.roi_pixels``) are both cut here, so a target
    cell and a pixel cell cover the same part of the image.
    """
    batch, num_rois = tf.shape(rois)[0], tf.shape(rois)[1]
    crops = roi_align(
        tf.cast(maps, tf.float32),
        tf.reshape(tf.cast(rois, tf.float32), [-1, 4]),  # [B, R, 4] -> [B*R, 4]
        tf.reshape(map_index, [-1]),  # [B*R]
        size,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
        implementation=implementation,
    )  # [B*R, size, size, C]
    return tf.reshape(crops, [batch, num_rois, size, size, crops.shape[-1]])


def mask_targets_for_rois(gt_masks, rois, matched_gt, mask_size):
    """Mask targets: gt masks bool ``[B, M, H, W]``, RoIs ``[B, R, 4]`` (y1, x1, y2, x2, pixels),
    matched gt index int32 ``[B, R]`` (>= 0) -> float32 ``[B, R, mask_size, mask_size]`` in {0, 1}.

    Each RoI's matched mask, cut along the RoI by RoIAlign (:func:`crop_rois`, the same sampling
    the mask head's features get) and binarized at 0.5.
    """
    shape = tf.shape(gt_masks)
    batch, num_gt, height, width = shape[0], shape[1], shape[2], shape[3]
    # Masks as one-channel maps: [B, M, H, W] -> [B*M, H, W, 1]
    masks = tf.reshape(tf.cast(gt_masks, tf.float32), [-1, height, width, 1])
    mask_index = tf.range(batch)[:, None] * num_gt + matched_gt  # [B, R] row of each RoI's mask
    crops = crop_rois(masks, rois, mask_index, mask_size)  # [B, R, m, m, 1]
    return tf.cast(crops[..., 0] >= 0.5, tf.float32)  # [B, R, m, m]


def detection_targets(proposals, num_proposals, gt_boxes, gt_class_ids, gt_masks, num_gt, *,
                      num_rois=128, positive_fraction=0.25, positive_iou=0.5,
                      negative_iou_high=0.5, negative_iou_low=0.0, mask_size=28,
                      box_weights=(10.0, 10.0, 5.0, 5.0), seed=0):
    """Sampled RoIs and their targets for the box and mask heads.

    Inputs: proposals ``[B, P, 4]`` with ``num_proposals [B]``; ground truth
    ``gt_boxes [B, M, 4]``, ``gt_class_ids`` int32 ``[B, M]``, ``gt_masks`` bool ``[B, M, H, W]``
    with ``num_gt [B]``.  Boxes are (y1, x1, y2, x2) in image pixels.  ``seed``: an int or an
    int ``[2]`` tensor for the stateless sampling (pass a new one every training step, e.g.
    ``(seed, step)``).

    Returns a dict, ``R = num_rois``:
        ``rois [B, R, 4]``, ``roi_valid`` bool ``[B, R]`` (False: padding slot, zero box),
        ``class_targets`` int32 ``[B, R]`` (0 = background, also for padding),
        ``box_targets [B, R, 4]`` deltas (dy, dx, dh, dw) x ``box_weights``, zero unless positive,
        ``mask_targets`` float32 ``[B, R, mask_size, mask_size]`` in {0, 1}, zero unless positive,
        ``positive`` bool ``[B, R]``,
        ``matched_gt`` int32 ``[B, R]``: row of the matched gt box, ``NO_MATCH`` unless positive.
    """
    _check_thresholds(positive_fraction, positive_iou, negative_iou_high, negative_iou_low)
    if num_rois < 1 or mask_size < 1:
        raise ValueError(f"num_rois and mask_size must be positive, got {num_rois}, {mask_size}")
    proposals = tf.stop_gradient(tf.convert_to_tensor(proposals, tf.float32))
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_class_ids = tf.convert_to_tensor(gt_class_ids, tf.int32)
    gt_masks = tf.convert_to_tensor(gt_masks, tf.bool)
    num_proposals = tf.convert_to_tensor(num_proposals, tf.int32)
    num_gt = tf.convert_to_tensor(num_gt, tf.int32)
    if proposals.shape.rank != 3 or gt_boxes.shape.rank != 3 or gt_masks.shape.rank != 4:
        raise ValueError(
            "expected proposals [B, P, 4], gt_boxes [B, M, 4] and gt_masks [B, M, H, W], got "
            f"{proposals.shape}, {gt_boxes.shape}, {gt_masks.shape}")

    # One always-invalid gt row, so that gathers stay legal when the batch has M = 0.
    gt_boxes = tf.pad(gt_boxes, [[0, 0], [0, 1], [0, 0]])  # [B, M+1, 4]
    gt_class_ids = tf.pad(gt_class_ids, [[0, 0], [0, 1]])  # [B, M+1]
    gt_masks = tf.pad(gt_masks, [[0, 0], [0, 1], [0, 0], [0, 0]])  # [B, M+1, H, W]
    gt_valid = tf.sequence_mask(num_gt, tf.shape(gt_boxes)[1])  # [B, M+1]

    # 1-2. Candidates and their best ground truth.
    candidates, candidate_valid = candidate_boxes(proposals, num_proposals, gt_boxes, num_gt)
    best_gt, best_iou = match_to_gt(candidates, gt_boxes, gt_valid)  # [B, N] each
    positive = candidate_valid & (best_iou >= positive_iou)
    negative = (candidate_valid & ~positive & (best_iou < negative_iou_high)
                & (best_iou >= negative_iou_low))

    # 3. Sample num_rois of them.
    index, roi_valid, roi_positive = sample_rois(positive, negative, num_rois, positive_fraction,
                                                 _as_seed(seed))  # [B, R] each
    rois = tf.where(roi_valid[..., None], tf.gather(candidates, index, batch_dims=1), 0.0)
    matched = tf.where(roi_positive, tf.gather(best_gt, index, batch_dims=1), NO_MATCH)  # [B, R]
    safe_matched = tf.maximum(matched, 0)  # gather index for every slot; unused unless positive

    # 4. Targets.
    class_targets = tf.where(
        roi_positive, tf.gather(gt_class_ids, safe_matched, batch_dims=1), 0)  # [B, R]
    matched_boxes = tf.gather(gt_boxes, safe_matched, batch_dims=1)  # [B, R, 4]
    # Non-positive slots encode against a unit box so that no 0-size box is ever divided by.
    unit_box = tf.constant([0.0, 0.0, 1.0, 1.0])
    reference = tf.where(roi_positive[..., None], rois, unit_box)
    target = tf.where(roi_positive[..., None], matched_boxes, unit_box)
    box_targets = tf.where(roi_positive[..., None], encode(target, reference, box_weights), 0.0)
    # Positives fill the first slots and there are at most max_positive of them, so only
    # those slots need a mask crop; the others are zeros.
    max_positive = int(num_rois * positive_fraction)
    masks = mask_targets_for_rois(gt_masks, rois[:, :max_positive],
                                  safe_matched[:, :max_positive], mask_size)  # [B, Pmax, m, m]
    masks = masks * tf.cast(roi_positive[:, :max_positive], tf.float32)[..., None, None]
    mask_targets = tf.pad(masks, [[0, 0], [0, num_rois - max_positive], [0, 0], [0, 0]])

    return {
        "rois": rois,
        "roi_valid": roi_valid,
        "class_targets": class_targets,
        "box_targets": box_targets,
        "mask_targets": mask_targets,
        "positive": roi_positive,
        "matched_gt": matched,
    }
