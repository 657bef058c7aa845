"""The whole Mask R-CNN: one ``keras.Model`` with a training path and an inference path.

He et al. 2017 (Mask R-CNN), on top of Faster R-CNN (Ren et al. 2015) and FPN (Lin et al. 2017).
The stages, each in the file named after it::

    images -> backbone.py + fpn.py -> P2..P6
           -> rpn.py (objectness, deltas per anchor of anchors.py)
           -> proposals.py (top-N, decode, clip, NMS)
           -> roi_align.py (7x7 for boxes, 14x14 for masks, from the right FPN level)
           -> heads.py (class, class-specific box, per-class mask)
    training:  + anchors.py labels and targets.py targets -> five named losses
    inference: + postprocess.py (per-class NMS, top-K, masks pasted into the image)

The talk asks for "separate models for training and inference".  minimask builds ONE
model with two paths that share every layer: :meth:`MaskRCNN.compute_losses` is the
training path (images + padded ground truth -> the losses ``rpn_class``, ``rpn_box``,
``class``, ``box``, ``mask``), :meth:`MaskRCNN.call` the inference path (images ->
detections).  Both call the same small stage methods below, so no weight can drift
between them and a single checkpoint serves both.

Shapes: B images of S x S pixels, A anchors, M ground-truth rows, R sampled RoIs,
Q = RoIs per image that reach the mask head, D = detections, K classes.
"""
import numpy as np
import tensorflow as tf
import keras

from minimask import anchors as anchor_ops
from minimask import backbone as backbone_lib
from minimask import fpn as fpn_lib
from minimask import heads as heads_lib
from minimask import postprocess
from minimask import proposals as proposal_lib
from minimask import rpn as rpn_lib
from minimask import targets as target_lib
from minimask.config import Config
from minimask.roi_align import MultiLevelRoIAlign

LOSS_NAMES = ("rpn_class", "rpn_box", "class", "box", "mask")

# Training stages: which losses count and which layer groups learn.  "joint" is the
# approximate joint training of the Mask R-CNN paper; the other four are the steps of
# Faster R-CNN's 4-step alternating training (Ren et al. 2015, Sec. 3.2).
STAGES = {
    "joint": {"losses": LOSS_NAMES, "train": ("backbone", "rpn", "heads")},
    "rpn": {"losses": ("rpn_class", "rpn_box"), "train": ("backbone", "rpn")},
    "detector": {"losses": ("class", "box", "mask"), "train": ("backbone", "heads")},
    "rpn_finetune": {"losses": ("rpn_class", "rpn_box"), "train": ("rpn",)},
    "heads_finetune": {"losses": ("class", "box", "mask"), "train": ("heads",)},
}


@keras.saving.register_keras_serializable(package="minimask")
class MaskRCNN(keras.Model):
    """Mask R-CNN built from a :class:`minimask.config.Config`.

    ``model(images uint8 [B, S, S, 3])`` -> detections ``{"boxes" [B, D, 4], "scores" [B, D],
    "class_ids" [B, D], "masks" [B, D, m, m] (probabilities in the box frame),
    "num_detections" [B]}``; :meth:`detect` adds full-resolution masks.
    ``model.fit(batches)`` trains on padded batches (see :mod:`minimask.data`).
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = Config()
        elif isinstance(config, dict):
            config = Config.from_dict(config)
        self.config = config
        c = config
        size = c.image_size
        if size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the stride of C5), got {size}")
        self.image_shape = (size, size)
        self.backbone_fpn = fpn_lib.build_backbone_fpn(
            c.backbone, input_shape=(size, size, 3), fpn_width=c.fpn_width,
            weights=c.backbone_weights or None, freeze_stages=c.freeze_stages,
            freeze_batchnorm=c.freeze_batchnorm,
        )
        num_anchors = anchor_ops.num_anchors_per_location(c.anchor_scales, c.anchor_ratios)
        self.rpn_head = rpn_lib.RPNHead(num_anchors=num_anchors, channels=c.fpn_width, name="rpn_head")
        self.proposal_layer = proposal_lib.ProposalLayer(
            pre_nms_top_n_train=c.rpn_pre_nms_train, post_nms_top_n_train=c.rpn_post_nms_train,
            pre_nms_top_n_inference=c.rpn_pre_nms_test, post_nms_top_n_inference=c.rpn_post_nms_test,
            nms_threshold=c.rpn_nms_iou, min_size=c.rpn_min_size, name="proposals",
        )
        roi_kwargs = dict(sampling_ratio=c.sampling_ratio, aligned=True, canonical_size=c.roi_canonical_size,
                          canonical_level=c.roi_canonical_level, min_level=2,
                          implementation=c.roi_align_implementation)
        self.box_pooler = MultiLevelRoIAlign(output_size=c.box_pool_size, name="box_roi_align", **roi_kwargs)
        self.mask_pooler = MultiLevelRoIAlign(output_size=c.mask_pool_size, name="mask_roi_align", **roi_kwargs)
        self.box_head = heads_lib.BoxHead(num_classes=c.num_classes, fc_width=c.box_head_width, name="box_head")
        self.mask_head = heads_lib.MaskHead(
            num_classes=c.num_classes, num_convs=c.mask_head_convs, width=c.mask_head_width, name="mask_head")
        self.anchors = tf.constant(
            anchor_ops.generate_anchors(self.image_shape, c.anchor_strides, c.anchor_scales, c.anchor_ratios))
        self.anchors_per_level = tuple(
            int(n) for n in anchor_ops.anchors_per_level(self.image_shape, c.anchor_strides, c.anchor_scales,
                                                         c.anchor_ratios))
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES + ("loss",)}
        # the last step's loss terms and whether it was finite, for train.StepLog (not Keras logs)
        self.last_losses = {name: tf.Variable(0.0, trainable=False, name=f"last_{name}") for name in LOSS_NAMES}
        self.last_finite = tf.Variable(True, trainable=False, name="last_finite")
        self.bad_batch_path = None  # where a non-finite step's batch is saved
        self.stage = "joint"
        self.proposal_model = None  # step 2 of the 4-step schedule takes proposals from another model

    # ------------------------------------------------------------------ stages of the model
    def features(self, images, training=False):
        """uint8 ``[B, S, S, 3]`` -> list of FPN maps P2..P6, ``[B, S/2^l, S/2^l, F]``."""
        x = backbone_lib.normalize_images(images)
        return list(self.backbone_fpn(x, training=training))

    def rpn(self, features, training=False):
        """P2..P6 -> (objectness logits ``[B, A]``, deltas ``[B, A, 4]``) in anchor order."""
        return self.rpn_head(features, training=training)

    def proposals(self, objectness, deltas, training=False):
        """RPN outputs -> (proposals ``[B, P, 4]``, scores ``[B, P]``, num_proposals ``[B]``)."""
        return self.proposal_layer(
            tf.stop_gradient(objectness), tf.stop_gradient(deltas), self.anchors,
            image_shape=self.image_shape, anchors_per_level=self.anchors_per_level, training=training)

    def box_branch(self, features, rois, training=False):
        """P2..P5 + RoIs ``[B, R, 4]`` -> (class logits ``[B, R, K+1]``, deltas ``[B, R, K, 4]``)."""
        pooled = self.box_pooler(features[:4], rois)  # [B, R, 7, 7, F]
        return self.box_head(pooled, training=training)

    def mask_branch(self, features, rois, training=False):
        """P2..P5 + boxes ``[B, Q, 4]`` -> mask logits ``[B, Q, 28, 28, K]``."""
        pooled = self.mask_pooler(features[:4], rois)  # [B, Q, 14, 14, F]
        return self.mask_head(pooled, training=training)

    # ------------------------------------------------------------------ inference path
    def call(self, images, training=False):
        c = self.config
        features = self.features(images, training=False)
        objectness, deltas = self.rpn(features)
        rois, _, num_rois = self.proposals(objectness, deltas, training=False)
        roi_valid = tf.range(tf.shape(rois)[1])[None, :] < num_rois[:, None]
        class_logits, box_deltas = self.box_branch(features, rois)
        detections = postprocess.detect(
            class_logits, box_deltas, rois, roi_valid, self.image_shape, box_weights=c.box_weights,
            score_threshold=c.score_threshold, nms_iou=c.detection_nms_iou, max_detections=c.max_detections,
            pre_nms_top_k=c.detection_pre_nms)
        mask_logits = self.mask_branch(features, detections["boxes"])
        probs = tf.sigmoid(tf.cast(mask_logits, tf.float32))
        detections["masks"] = postprocess.select_class_masks(probs, detections["class_ids"])
        return detections

    def detect(self, images, mask_threshold=0.5):
        """Detections as numpy, one dict per image, valid rows only, masks pasted at full resolution.

        ``[{"boxes" [D, 4], "scores" [D], "class_ids" [D], "masks" bool [D, S, S]}, ...]``
        """
        out = self.predict_batch(images)
        results = []
        for b in range(out["boxes"].shape[0]):
            n = int(out["num_detections"][b])
            boxes = out["boxes"][b, :n]
            masks = postprocess.paste_masks(out["masks"][b, :n], boxes, self.image_shape, mask_threshold)
            results.append({"boxes": boxes, "scores": out["scores"][b, :n],
                            "class_ids": out["class_ids"][b, :n], "masks": masks.numpy()})
        return results

    @tf.function(reduce_retracing=True)
    def _predict_graph(self, images):
        return self(images, training=False)

    def predict_batch(self, images):
        """``images`` uint8 ``[B, S, S, 3]`` -> the padded detections of :meth:`call`, as numpy."""
        return {k: v.numpy() for k, v in self._predict_graph(tf.convert_to_tensor(images, tf.uint8)).items()}

    # ------------------------------------------------------------------ training path
    def compute_losses(self, batch, training=True, step=0):
        """Padded batch -> dict of the five named scalar losses (those of the current stage)."""
        c = self.config
        wanted = STAGES[self.stage]["losses"]
        losses = {}
        images = batch["image"]
        gt_boxes = tf.cast(batch["boxes"], tf.float32)
        num_gt = tf.cast(batch["num_instances"], tf.int32)
        seed = tf.stack([tf.cast(c.seed, tf.int64), tf.cast(step, tf.int64)])
        features = self.features(images, training=training)

        objectness, deltas = self.rpn(features, training=training)
        if "rpn_class" in wanted:
            labels, matched = anchor_ops.label_anchors(
                self.anchors, gt_boxes, num_gt, batch.get("ignore_boxes"), batch.get("num_ignore"),
                positive_threshold=c.rpn_positive_iou, negative_threshold=c.rpn_negative_iou)
            labels = anchor_ops.sample_anchors(labels, c.rpn_samples_per_image, c.rpn_positive_fraction, seed=seed)
            delta_targets = anchor_ops.rpn_targets(self.anchors, gt_boxes, matched, labels)
            losses["rpn_class"], losses["rpn_box"] = rpn_lib.rpn_losses(objectness, deltas, labels, delta_targets)

        if "class" in wanted:
            if self.proposal_model is not None:  # 4-step schedule, step 2: proposals of a fixed RPN
                p_features = self.proposal_model.features(images, training=False)
                p_obj, p_deltas = self.proposal_model.rpn(p_features)
                proposals, _, num_proposals = self.proposal_model.proposals(p_obj, p_deltas, training=True)
            else:
                proposals, _, num_proposals = self.proposals(objectness, deltas, training=True)
            targets = target_lib.detection_targets(
                proposals, num_proposals, gt_boxes, tf.cast(batch["class_ids"], tf.int32), batch["masks"], num_gt,
                num_rois=c.rois_per_image, positive_fraction=c.roi_positive_fraction,
                positive_iou=c.roi_positive_iou, negative_iou_high=c.roi_positive_iou,
                mask_size=c.mask_size, box_weights=c.box_weights, seed=seed + 1)
            class_logits, box_deltas = self.box_branch(features, targets["rois"], training=training)
            losses["class"], losses["box"] = heads_lib.box_head_losses(
                class_logits, box_deltas, targets["class_targets"], targets["box_targets"],
                targets["positive"], targets["roi_valid"])
            # Only positive RoIs train the mask head (Mask R-CNN Sec. 3.1: "L_mask is defined only
            # on positive RoIs"); at most mask_rois_per_image of them per image.
            mask_rois, mask_targets, mask_classes, mask_positive = _take_positives(
                targets, min(c.mask_rois_per_image, int(c.rois_per_image * c.roi_positive_fraction)))
            mask_logits = self.mask_branch(features, mask_rois, training=training)
            losses["mask"] = heads_lib.mask_loss(mask_logits, mask_targets, mask_classes, mask_positive)
        for name in LOSS_NAMES:
            losses.setdefault(name, tf.constant(0.0))
        return {name: tf.cast(value, tf.float32) for name, value in losses.items()}

    def set_stage(self, stage, proposal_model=None):
        """Choose what trains (see ``STAGES``); recompile afterwards, as Keras requires."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGES)}")
        self.stage = stage
        self.proposal_model = proposal_model
        if proposal_model is not None:
            proposal_model.trainable = False
        groups = STAGES[stage]["train"]
        self.backbone_fpn.trainable = "backbone" in groups
        if "backbone" in groups:  # re-apply the config's own freezing of stem / stages / BN
            backbone_lib.freeze(self.backbone_fpn, freeze_stages=self.config.freeze_stages,
                                freeze_batchnorm=self.config.freeze_batchnorm)
        self.rpn_head.trainable = "rpn" in groups
        self.box_head.trainable = "heads" in groups
        self.mask_head.trainable = "heads" in groups

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            losses = self.compute_losses(batch, training=True, step=self.optimizer.iterations)
            total = tf.add_n(list(losses.values()))
        variables = self.trainable_variables
        grads = tape.gradient(total, variables)
        finite = tf.math.is_finite(total)
        for g in grads:
            if g is not None:
                finite &= tf.reduce_all(tf.math.is_finite(g))
        # The NaN/Inf guard: a non-finite step is skipped entirely (no update, no optimizer
        # step, momentum untouched), its batch is saved, and train.StepLog stops training.
        keys = sorted(batch)

        def apply():
            self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            return tf.constant(True)

        def skip():
            return tf.py_function(lambda *arrays: self._save_bad_batch(keys, arrays),
                                  [batch[k] for k in keys], tf.bool)

        tf.cond(finite, apply, skip)
        self.last_finite.assign(finite)
        for name, value in losses.items():
            self.last_losses[name].assign(value)
            self.loss_trackers[name].update_state(value)
        self.loss_trackers["loss"].update_state(total)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def _save_bad_batch(self, keys, arrays):
        if self.bad_batch_path:
            np.savez_compressed(self.bad_batch_path, **{k: a.numpy() for k, a in zip(keys, arrays)})
        return True

    def test_step(self, batch):
        losses = self.compute_losses(batch, training=False, step=0)
        total = tf.add_n(list(losses.values()))
        for name, value in losses.items():
            self.loss_trackers[name].update_state(value)
        self.loss_trackers["loss"].update_state(total)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    # ------------------------------------------------------------------ keras plumbing
    def get_config(self):
        base = super().get_config()
        base["config"] = self.config.to_dict()
        return base

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        inner = config.pop("config")
        return cls(config=inner, **{k: v for k, v in config.items() if k in ("name", "trainable")})

    def build_all(self):
        """Create every weight by running both paths once on zeros (before loading weights)."""
        c = self.config
        s = c.image_size
        batch = {
            "image": tf.zeros([1, s, s, 3], tf.uint8),
            "boxes": tf.constant([[[8.0, 8.0, 40.0, 40.0]] + [[0.0] * 4] * (c.max_instances - 1)]),
            "class_ids": tf.constant([[1] + [0] * (c.max_instances - 1)], tf.int32),
            "masks": tf.zeros([1, c.max_instances, s, s], tf.bool),
            "num_instances": tf.constant([1], tf.int32),
        }
        stage = self.stage
        self.stage = "joint"
        self.compute_losses(batch, training=False)
        self.stage = stage
        self(batch["image"])
        return self


def _take_positives(targets, count):
    """The first ``count`` RoI slots of each image, where :func:`targets.detection_targets` puts
    the positives: rois ``[B, Q, 4]``, mask targets ``[B, Q, m, m]``, class targets ``[B, Q]``,
    and bool ``[B, Q]`` marking the slots that really hold a positive RoI."""
    return tuple(targets[key][:, :count] for key in ("rois", "mask_targets", "class_targets", "positive"))
