"""Region Proposal Network head and losses: objectness and box deltas for every anchor.

Faster R-CNN (Ren et al. 2015, Sec. 3.1): a small network slides over the feature map.  At each
position a 3x3 convolution (+ ReLU) looks at the neighbourhood, then two sibling 1x1
convolutions predict, for each of the ``k`` anchors of that position, an objectness score
(object or not) and four box deltas ``(dy, dx, dh, dw)`` that move the anchor onto the object.
With a feature pyramid (FPN, Lin et al. 2017, Sec. 4.1) the same head, with the same weights,
runs on every level: the anchor size changes with the level, the head does not.

The loss is Faster R-CNN Eqn. 1: a classification loss over the sampled anchors
(:func:`minimask.anchors.sample_anchors`) plus a smooth-L1 box loss over the positive ones.

Shape shorthand: ``B`` images; level ``l`` has an ``[Hl, Wl]`` feature map; ``k`` anchors per
position; ``A = sum_l Hl * Wl * k`` anchors in all, in the order of
:func:`minimask.anchors.generate_anchors` (level, then y, then x, then anchor shape).
"""
import keras
import tensorflow as tf

from minimask.anchors import NEUTRAL, OBJECT
from minimask.boxes import smooth_l1

# Faster R-CNN's RPN uses smooth L1 with sigma = 3, i.e. a quadratic zone |x| < beta = 1 / sigma**2.
DEFAULT_SMOOTH_L1_BETA = 1.0 / 9.0


@keras.saving.register_keras_serializable(package="minimask")
class RPNHead(keras.layers.Layer):
    """Shared RPN head: list of ``[B, Hl, Wl, C]`` feature maps -> (logits ``[B, A]``, deltas ``[B, A, 4]``).

    Objectness is ONE logit per anchor, trained with sigmoid binary cross-entropy.  The talk
    (and the Faster R-CNN paper) use two scores per anchor, (no object, object), with a 2-way
    softmax.  That is the same model: ``softmax(z0, z1)[1] = 1 / (1 + exp(z0 - z1)) =
    sigmoid(z1 - z0)``, so only the difference of the two scores matters and fixing ``z0 = 0``
    loses nothing, while it halves the objectness channels.

    The deltas' channels of a position are grouped per anchor, ``[a0: dy dx dh dw, a1: ..., ...]``,
    so that ``[B, H, W, k*4]`` reshapes to ``[B, H*W*k, 4]`` in anchor order.

    The 3x3 convolution uses "same" padding (the talk says "valid"): one prediction per feature
    cell, matching the anchor grid of :func:`minimask.anchors.generate_anchors`.  All weights start
    from a normal distribution of std ``init_stddev`` (0.01, as in the paper) and biases from 0,
    so every initial logit is close to 0: probability 1/2 and a classification loss of ln 2.
    """

    def __init__(self, num_anchors=3, channels=256, init_stddev=0.01, seed=None, **kwargs):
        super().__init__(**kwargs)
        if num_anchors < 1 or channels < 1:
            raise ValueError(f"num_anchors and channels must be >= 1, got {num_anchors}, {channels}")
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        self.init_stddev = float(init_stddev)
        self.seed = seed

        def conv(filters, size, name, seed_offset, activation=None):
            # Each convolution gets its own seed, so that the three do not start out equal.
            layer_seed = None if seed is None else int(seed) + seed_offset
            return keras.layers.Conv2D(
                filters, size, padding="same", activation=activation, name=name,
                kernel_initializer=keras.initializers.RandomNormal(stddev=self.init_stddev, seed=layer_seed),
                bias_initializer="zeros",
            )

        self.conv = conv(channels, 3, "conv", 0, activation="relu")  # the sliding window
        self.objectness = conv(num_anchors, 1, "objectness", 1)  # one logit per anchor
        self.deltas = conv(4 * num_anchors, 1, "deltas", 2)  # (dy, dx, dh, dw) per anchor

    def build(self, input_shape):
        # input_shape: one [B, H, W, C] shape or a list of them (one per level, same C).
        shapes = input_shape if isinstance(input_shape[0], (list, tuple)) else [input_shape]
        features = tuple(shapes[0][-1:])
        self.conv.build((None, None, None) + features)
        self.objectness.build((None, None, None, self.channels))
        self.deltas.build((None, None, None, self.channels))

    def call(self, features):
        if not isinstance(features, (list, tuple)):
            features = [features]
        logits, deltas = [], []
        for level in features:  # a handful of pyramid levels, not anchors
            batch = tf.shape(level)[0]
            # anchors of this level per image: static when the map size is, so A stays static
            height, width = level.shape[1], level.shape[2]
            per_image = -1 if height is None or width is None else height * width * self.num_anchors
            hidden = self.conv(level)  # [B, Hl, Wl, C] -> [B, Hl, Wl, channels]
            level_logits = self.objectness(hidden)  # [B, Hl, Wl, k]
            level_deltas = self.deltas(hidden)  # [B, Hl, Wl, k*4]
            logits.append(tf.reshape(level_logits, [batch, per_image]))  # [B, Hl, Wl, k] -> [B, Hl*Wl*k]
            deltas.append(tf.reshape(level_deltas, [batch, per_image, 4]))  # [B, Hl, Wl, k*4] -> [B, Hl*Wl*k, 4]
        return tf.concat(logits, axis=1), tf.concat(deltas, axis=1)  # [B, A], [B, A, 4]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_anchors=self.num_anchors, channels=self.channels, init_stddev=self.init_stddev, seed=self.seed
        )
        return config


def rpn_losses(objectness, deltas, labels, delta_targets, beta=DEFAULT_SMOOTH_L1_BETA):
    """RPN losses: logits ``[B, A]``, deltas / targets ``[B, A, 4]``, labels ``[B, A]`` -> (class_loss, box_loss).

    ``labels`` are the *sampled* labels (:func:`minimask.anchors.sample_anchors`): OBJECT (1),
    NO_OBJECT (-1) or NEUTRAL (0), and neutral anchors are ignored.

    * class_loss: sigmoid binary cross-entropy, averaged over the sampled (non-neutral) anchors
      of the whole batch.
    * box_loss: :func:`smooth_l1` (``beta``, default 1/9 as in Faster R-CNN and Detectron;
      0 gives L1) of ``deltas - delta_targets``, summed over the 4 coordinates of the positive
      anchors and divided by the number of sampled anchors of the batch (the Detectron2
      convention; the paper divides by the number of anchor positions and weights by
      lambda = 10, about the same scale).

    Both are scalars, 0 (never NaN) when nothing is sampled, and the box loss is 0 without positives.
    """
    objectness = tf.convert_to_tensor(objectness, tf.float32)
    deltas = tf.convert_to_tensor(deltas, tf.float32)
    labels = tf.convert_to_tensor(labels, tf.int32)
    delta_targets = tf.convert_to_tensor(delta_targets, tf.float32)
    if objectness.shape.rank != 2 or deltas.shape.rank != 3 or labels.shape.rank != 2:
        raise ValueError(
            f"expected objectness [B, A], deltas [B, A, 4], labels [B, A]; "
            f"got {objectness.shape}, {deltas.shape}, {labels.shape}"
        )
    sampled = labels != NEUTRAL  # [B, A]
    positive = labels == OBJECT  # [B, A]
    num_sampled = tf.reduce_sum(tf.cast(sampled, tf.float32))

    is_object = tf.cast(positive, tf.float32)
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=is_object, logits=objectness)  # [B, A]
    class_loss = tf.math.divide_no_nan(tf.reduce_sum(tf.where(sampled, cross_entropy, 0.0)), num_sampled)

    per_anchor = tf.reduce_sum(smooth_l1(deltas - delta_targets, beta), axis=-1)  # [B, A, 4] -> [B, A]
    # tf.where, not a multiplication by 0/1: the deltas of unused anchors may be anything.
    box_loss = tf.math.divide_no_nan(tf.reduce_sum(tf.where(positive, per_anchor, 0.0)), num_sampled)
    return class_loss, box_loss
