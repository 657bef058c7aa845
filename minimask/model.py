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

Precision: with ``config.mixed_precision`` the convolutions and fully connected layers compute
in float16/bfloat16 (Keras dtype policy, variables stay float32), while everything that needs
the digits stays float32: the RPN and head outputs are cast right away, so the losses,
softmax/sigmoid, box decoding, proposals, RoIAlign (its box coordinates) and the detection
layer all run in float32.

Several devices (``tf.distribute``): each replica gets ``B / replicas`` images of the global
batch.  :meth:`MaskRCNN.compute_losses` then returns this replica's *share* of each loss, so that
the sum over replicas is the loss of the global batch, which is what the optimizer's summing
all-reduce of the gradients needs; :meth:`MaskRCNN.train_step` makes every replica agree on
skipping a non-finite step, and clips the *global* gradient.
"""
import contextlib

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

    def __init__(self, config=None, load_backbone_weights=True, **kwargs):
        super().__init__(**kwargs)
        # False when the weights come from a saved model anyway (loading a .keras file): the
        # config's initial backbone weights are then neither needed nor, maybe, reachable.
        self._load_backbone_weights = load_backbone_weights
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
        if c.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {c.mixed_precision!r}")
        if c.backbone_weights == "imagenet" and c.pixel_normalization != "caffe":
            raise ValueError('keras.applications\' ImageNet weights expect pixel_normalization="caffe", '
                             f"got {c.pixel_normalization!r}")
        with dtype_policy(c.mixed_precision or "float32"):
            self._build_layers(c)
        self.anchors = tf.constant(
            anchor_ops.generate_anchors(self.image_shape, c.anchor_strides, c.anchor_scales, c.anchor_ratios))
        self.anchors_per_level = tuple(
            int(n) for n in anchor_ops.anchors_per_level(self.image_shape, c.anchor_strides, c.anchor_scales,
                                                         c.anchor_ratios))
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES + ("loss",)}
        # The last step's loss terms (of the global batch) and whether it was finite, for
        # train.StepLog (not Keras logs).  Every replica assigns the same all-reduced values;
        # ONLY_FIRST_REPLICA lets them do so under tf.distribute.
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.last_losses = {name: tf.Variable(0.0, trainable=False, name=f"last_{name}", aggregation=first)
                            for name in LOSS_NAMES}
        self.last_finite = tf.Variable(True, trainable=False, name="last_finite", aggregation=first)
        self.bad_batch_path = None  # where a non-finite step's batch is saved
        self.stage = "joint"
        self.proposal_model = None  # step 2 of the 4-step schedule takes proposals from another model

    def _build_layers(self, c):
        """The layers, under the dtype policy of ``__init__``; the two layers that take boxes stay float32."""
        size = c.image_size
        self.backbone_fpn = fpn_lib.build_backbone_fpn(
            c.backbone, input_shape=(size, size, 3), fpn_width=c.fpn_width,
            weights=(c.backbone_weights or None) if self._load_backbone_weights else None,
            freeze_stages=c.freeze_stages,
            freeze_batchnorm=c.freeze_batchnorm,
        )
        num_anchors = anchor_ops.num_anchors_per_location(c.anchor_scales, c.anchor_ratios)
        self.rpn_head = rpn_lib.RPNHead(num_anchors=num_anchors, channels=c.fpn_width, name="rpn_head")
        self.proposal_layer = proposal_lib.ProposalLayer(
            pre_nms_top_n_train=c.rpn_pre_nms_train, post_nms_top_n_train=c.rpn_post_nms_train,
            pre_nms_top_n_inference=c.rpn_pre_nms_test, post_nms_top_n_inference=c.rpn_post_nms_test,
            nms_threshold=c.rpn_nms_iou, min_size=c.rpn_min_size, name="proposals", dtype="float32",
        )
        roi_kwargs = dict(sampling_ratio=c.sampling_ratio, aligned=True, canonical_size=c.roi_canonical_size,
                          canonical_level=c.roi_canonical_level, min_level=2,
                          implementation=c.roi_align_implementation,
                          # float32: Keras would cast the boxes to the compute dtype too, and
                          # bfloat16 keeps 8 bits: a coordinate near 1000 px would move by 4 px.
                          dtype="float32")
        self.box_pooler = MultiLevelRoIAlign(output_size=c.box_pool_size, name="box_roi_align", **roi_kwargs)
        self.mask_pooler = MultiLevelRoIAlign(output_size=c.mask_pool_size, name="mask_roi_align", **roi_kwargs)
        self.box_head = heads_lib.BoxHead(num_classes=c.num_classes, fc_width=c.box_head_width, name="box_head")
        self.mask_head = heads_lib.MaskHead(
            num_classes=c.num_classes, num_convs=c.mask_head_convs, width=c.mask_head_width,
            pixel_channels=c.mask_head_pixels, name="mask_head")

    # ------------------------------------------------------------------ stages of the model
    def features(self, images, training=False):
        """uint8 ``[B, S, S, 3]`` -> list of FPN maps P2..P6, ``[B, S/2^l, S/2^l, F]``."""
        x = backbone_lib.normalize_images(images, mode=self.config.pixel_normalization)
        return list(self.backbone_fpn(x, training=training))

    def rpn(self, features, training=False):
        """P2..P6 -> (objectness logits ``[B, A]``, deltas ``[B, A, 4]``) in anchor order, float32."""
        objectness, deltas = self.rpn_head(features, training=training)
        return tf.cast(objectness, tf.float32), tf.cast(deltas, tf.float32)

    def proposals(self, objectness, deltas, training=False):
        """RPN outputs -> (proposals ``[B, P, 4]``, scores ``[B, P]``, num_proposals ``[B]``)."""
        return self.proposal_layer(
            tf.stop_gradient(objectness), tf.stop_gradient(deltas), self.anchors,
            image_shape=self.image_shape, anchors_per_level=self.anchors_per_level, training=training)

    def box_branch(self, features, rois, training=False):
        """P2..P5 + RoIs ``[B, R, 4]`` -> (class logits ``[B, R, K+1]``, deltas ``[B, R, K, 4]``)."""
        pooled = self.box_pooler(features[:4], rois)  # [B, R, 7, 7, F]
        class_logits, deltas = self.box_head(pooled, training=training)
        return tf.cast(class_logits, tf.float32), tf.cast(deltas, tf.float32)

    def mask_branch(self, features, rois, training=False, images=None):
        """P2..P5 + boxes ``[B, Q, 4]`` -> mask logits ``[B, Q, 28, 28, K]``.

        ``images`` (uint8 ``[B, S, S, 3]``) are needed when the mask head also sees the RoIs'
        pixels (``config.mask_head_pixels > 0``).
        """
        pooled = self.mask_pooler(features[:4], rois)  # [B, Q, 14, 14, F]
        if not self.config.mask_head_pixels:
            return tf.cast(self.mask_head(pooled, training=training), tf.float32)
        if images is None:
            raise ValueError("config.mask_head_pixels > 0: mask_branch needs the images too")
        pixels = self.roi_pixels(images, rois)  # [B, Q, 28, 28, 3]
        return tf.cast(self.mask_head(pooled, pixels, training=training), tf.float32)

    def roi_pixels(self, images, rois):
        """uint8 images ``[B, S, S, 3]`` + boxes ``[B, Q, 4]`` -> normalized pixels ``[B, Q, m, m, 3]``
        (m = mask_size), cut by ``targets.crop_rois`` like the mask targets."""
        c = self.config
        x = backbone_lib.normalize_images(images, mode=c.pixel_normalization)  # float32 [B, S, S, 3]
        image_index = tf.broadcast_to(tf.range(tf.shape(rois)[0])[:, None], tf.shape(rois)[:2])  # [B, Q]
        return target_lib.crop_rois(x, rois, image_index, c.mask_size, implementation=c.roi_align_implementation)

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
        mask_logits = self.mask_branch(features, detections["boxes"], images=images)
        probs = tf.sigmoid(mask_logits)
        detections["masks"] = postprocess.select_class_masks(probs, detections["class_ids"])
        return detections

    def detect(self, images, mask_threshold=None):
        """Detections as numpy, one dict per image, valid rows only, masks pasted at full resolution.

        ``[{"boxes" [D, 4], "scores" [D], "class_ids" [D], "masks" bool [D, S, S]}, ...]``;
        ``mask_threshold`` defaults to the config's.
        """
        if mask_threshold is None:
            mask_threshold = self.config.mask_threshold
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
        """Padded batch -> dict of the five named scalar float32 losses (those of the current stage).

        Under ``tf.distribute`` with several replicas, each replica's values are its share of
        the global batch's losses (they add up to them over the replicas; see ``_replica_shares``).
        """
        c = self.config
        wanted = STAGES[self.stage]["losses"]
        losses = {}
        normalizers = {}  # the count each loss was divided by, for _replica_shares
        images = batch["image"]
        gt_boxes = tf.cast(batch["boxes"], tf.float32)
        num_gt = tf.cast(batch["num_instances"], tf.int32)
        seed = tf.stack([tf.cast(c.seed, tf.int64), tf.cast(step, tf.int64)])
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # replicas hold different images: give each its own stream of random samples
            seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        features = self.features(images, training=training)

        objectness, deltas = self.rpn(features, training=training)
        if "rpn_class" in wanted:
            labels, matched = anchor_ops.label_anchors(
                self.anchors, gt_boxes, num_gt, batch.get("ignore_boxes"), batch.get("num_ignore"),
                positive_threshold=c.rpn_positive_iou, negative_threshold=c.rpn_negative_iou)
            labels = anchor_ops.sample_anchors(labels, c.rpn_samples_per_image, c.rpn_positive_fraction, seed=seed)
            delta_targets = anchor_ops.rpn_targets(self.anchors, gt_boxes, matched, labels)
            losses["rpn_class"], losses["rpn_box"] = rpn_lib.rpn_losses(objectness, deltas, labels, delta_targets)
            # both divided by the number of sampled anchors of the batch (rpn.rpn_losses)
            normalizers["rpn_class"] = normalizers["rpn_box"] = _count(labels != anchor_ops.NEUTRAL)

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
                targets["positive"], targets["roi_valid"], smooth_l1_beta=c.box_smooth_l1_beta)
            normalizers["class"] = normalizers["box"] = _count(targets["roi_valid"])  # heads.box_head_losses
            # Only positive RoIs train the mask head (Mask R-CNN Sec. 3.1: "L_mask is defined only
            # on positive RoIs"); at most mask_rois_per_image of them per image.
            mask_rois, mask_targets, mask_classes, mask_positive = _take_positives(
                targets, min(c.mask_rois_per_image, int(c.rois_per_image * c.roi_positive_fraction)))
            mask_logits = self.mask_branch(features, mask_rois, training=training, images=images)
            losses["mask"] = heads_lib.mask_loss(mask_logits, mask_targets, mask_classes, mask_positive)
            normalizers["mask"] = _count(mask_positive)  # heads.mask_loss: divided by the positives
        losses = {name: tf.cast(value, tf.float32) for name, value in losses.items()}
        losses = _replica_shares(losses, normalizers)
        for name in LOSS_NAMES:
            losses.setdefault(name, tf.constant(0.0))
        return {name: losses[name] for name in LOSS_NAMES}

    def set_stage(self, stage, proposal_model=None):
        """Choose what trains (see ``STAGES``); recompile afterwards, as Keras requires."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGES)}")
        self.stage = stage
        # a reference, not a sub-layer: bypass Keras' tracking, which is locked once the model is built
        # (and must not save the other model's weights inside this one)
        object.__setattr__(self, "proposal_model", proposal_model)
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
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            losses = self.compute_losses(batch, training=True, step=self.optimizer.iterations)
            share = tf.add_n(list(losses.values()))  # this replica's share of the global loss
            # mixed_float16: times the dynamic loss scale (keras LossScaleOptimizer); else unchanged
            scaled = self.optimizer.scale_loss(share)
        pairs = [(g, v) for g, v in zip(tape.gradient(scaled, self.trainable_variables), self.trainable_variables)
                 if g is not None]
        grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
        # One all-reduce gives every replica the global batch's losses and the number of replicas
        # whose gradient is not finite, so that all of them take the same decision below.
        bad_grads = tf.cast(tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])),
                            tf.float32)
        report = _sum_over_replicas(tf.stack([losses[name] for name in LOSS_NAMES] + [bad_grads]))
        losses = dict(zip(LOSS_NAMES, tf.unstack(report[:-1])))
        total = tf.reduce_sum(report[:-1])
        finite = tf.math.is_finite(total)
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # (a LossScaleOptimizer skips overflowing gradients itself and lowers its scale)
            finite &= report[-1] == 0.0
        if replicas > 1:
            grads = self._clip_global_gradient(grads)
        # The NaN/Inf guard: a non-finite step is skipped entirely (no update, no optimizer
        # step, momentum untouched), its batch is saved, and train.StepLog stops training.
        self._apply_if(finite, grads, variables, batch)
        self.last_finite.assign(finite)
        for name, value in losses.items():
            self.last_losses[name].assign(value)
            self.loss_trackers[name].update_state(value)
        self.loss_trackers["loss"].update_state(total)
        return _step_logs(self.loss_trackers)

    def _clip_global_gradient(self, grads):
        """Several replicas: clip the *global* gradient by the optimizer's ``global_clipnorm``.

        Keras clips each replica's gradient before it sums them, which is not the same; so sum
        them here, clip, and hand each replica 1/replicas of the result (the optimizer's own
        sum then gives back the clipped global gradient, and its own clipping does nothing).
        """
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        clip = getattr(optimizer, "global_clipnorm", None)
        if not clip:
            return grads
        replica = tf.distribute.get_replica_context()
        summed = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        # the gradients are of the scaled loss with mixed_float16: clip at the scaled norm
        limit = clip * self.optimizer.scale_loss(tf.constant(1.0))
        clipped, _ = tf.clip_by_global_norm(summed, limit)
        return [g / replica.num_replicas_in_sync for g in clipped]

    def _apply_if(self, finite, grads, variables, batch):
        """Apply the gradients when ``finite`` (the same on every replica), else save the batch."""
        keys = sorted(batch)
        arrays = [batch[k] for k in keys]

        def save(*arrays):
            return tf.py_function(lambda *xs: self._save_bad_batch(keys, xs), arrays, tf.bool)

        if not tf.distribute.has_strategy():  # one device
            def apply():
                self.optimizer.apply_gradients(zip(grads, variables))
                return tf.constant(True)

            tf.cond(finite, apply, lambda: save(*arrays))
            return

        # tf.distribute: apply_gradients synchronizes the replicas (merge_call), which a tf.cond
        # in a replica cannot contain; so the decision is taken once, in cross-replica context,
        # and the update then runs on every replica (as keras' LossScaleOptimizer does).
        def decide(strategy, finite, grads, arrays):
            def apply():
                strategy.extended.call_for_each_replica(
                    lambda g: self.optimizer.apply_gradients(zip(g, variables)), args=(grads,))
                return tf.constant(True)

            def skip():  # the whole global batch (this worker's replicas), in order
                return save(*[tf.concat(strategy.experimental_local_results(a), axis=0) for a in arrays])

            # every replica computed the same all-reduced flag: take the first one's
            return tf.cond(strategy.experimental_local_results(finite)[0], apply, skip)

        tf.distribute.get_replica_context().merge_call(decide, args=(finite, grads, arrays))

    def _save_bad_batch(self, keys, arrays):
        if self.bad_batch_path:
            np.savez_compressed(self.bad_batch_path, **{k: a.numpy() for k, a in zip(keys, arrays)})
        return True

    def test_step(self, batch):
        losses = self.compute_losses(batch, training=False, step=0)
        summed = _sum_over_replicas(tf.stack([losses[name] for name in LOSS_NAMES]))  # global-batch losses
        losses = dict(zip(LOSS_NAMES, tf.unstack(summed)))
        total = tf.add_n(list(losses.values()))
        for name, value in losses.items():
            self.loss_trackers[name].update_state(value)
        self.loss_trackers["loss"].update_state(total)
        return _step_logs(self.loss_trackers)

    # ------------------------------------------------------------------ keras plumbing
    def get_config(self):
        base = super().get_config()
        base["config"] = self.config.to_dict()
        return base

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: ``build_all`` (or loading) created every weight eagerly.

        Keras' TensorFlow trainer would otherwise average a first batch over the replicas
        to build the model symbolically, which fails on the bool masks of a batch.
        """
        return

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        inner = config.pop("config")
        # every weight comes from the saved file: do not load the config's initial backbone weights
        return cls(config=inner, load_backbone_weights=False,
                   **{k: v for k, v in config.items() if k in ("name", "trainable")})

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


PRECISIONS = ("", "float32", "mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy set to ``name`` inside the block, restored after it.

    Layers take the global policy when they are created; the scope keeps a model's
    precision (its config's ``mixed_precision``) from leaking into other models.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _count(mask):
    """Number of True entries of a bool tensor, as a float32 scalar."""
    return tf.reduce_sum(tf.cast(mask, tf.float32))


def _sum_over_replicas(value):
    """The sum of ``value`` over the replicas of a tf.distribute strategy (``value`` itself with one)."""
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        return value
    return replica.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _replica_shares(losses, normalizers):
    """Each loss as this replica's share of the global batch's loss.

    Every loss is a sum over this replica's images divided by a count ``n`` of them (sampled
    anchors, valid RoIs, positive RoIs; 0 counts as 1, as in the loss functions).  The loss of
    the global batch divides the sum of all replicas' sums by the sum of their counts ``N``, so
    this replica's share is ``loss * n / N``: the shares add up to the global loss, and their
    gradients, summed by the optimizer, to its gradient.  (Scaling by 1 / replicas instead would
    average the replicas' means, which is not the global mean when the counts differ.)
    With one replica this returns ``losses`` unchanged.
    """
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1 or not losses:
        return losses
    names = sorted(losses)
    counts = tf.stop_gradient(tf.stack([normalizers[name] for name in names]))  # [L] this replica's n
    total = tf.maximum(replica.all_reduce(tf.distribute.ReduceOp.SUM, counts), 1.0)  # [L] N
    local = tf.maximum(counts, 1.0)
    return {name: losses[name] * local[i] / total[i] for i, name in enumerate(names)}


def _step_logs(trackers):
    """The values a train/test step returns to Keras: each tracker's mean so far.

    Across several machines Keras' TensorFlow trainer averages them over the workers with
    ``strategy.reduce("MEAN", value, axis=0)``, which needs an axis to reduce: there they get
    one of length 1 (a scalar fails, tensorflow/tensorflow#72388).  The condition is the one
    Keras tests (``_collective_all_reduce_multi_worker`` in its trainer).
    """
    logs = {name: tracker.result() for name, tracker in trackers.items()}
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _take_positives(targets, count):
    """The first ``count`` RoI slots of each image, where :func:`targets.detection_targets` puts
    the positives: rois ``[B, Q, 4]``, mask targets ``[B, Q, m, m]``, class targets ``[B, Q]``,
    and bool ``[B, Q]`` marking the slots that really hold a positive RoI."""
    return tuple(targets[key][:, :count] for key in ("rois", "mask_targets", "class_targets", "positive"))
