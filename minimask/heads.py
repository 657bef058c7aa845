"""The RoI heads: what each pooled RoI is (box head) and which of its pixels are the object
(mask head), with their losses.

Box head (Fast R-CNN, Girshick 2015, Sec. 2; FPN, Lin et al. 2017, Sec. 4.2 "2fc" head)
    7x7 pooled features -> flatten -> two fully connected layers with ReLU ->
    * class logits ``[..., K + 1]``: a softmax over the K classes *and* "no object"
      (index 0), trained with the multinomial cross-entropy (Fast R-CNN Eqn. 1, L_cls);
    * class-specific box deltas ``[..., K, 4]``: row ``k - 1`` refines the RoI for class ``k``;
      the background has no box, so it has no row (Detectron2's layout; torchvision keeps
      a useless background row).  Trained with a smooth L1 loss on the row of the
      ground-truth class of positive RoIs only (Fast R-CNN Eqn. 2-3, L_loc).
Mask head (Mask R-CNN, He et al. 2017, Sec. 3 and Fig. 4 right, the FPN variant)
    14x14 pooled features -> ``num_convs`` 3x3 convolutions with ReLU -> 2x2 stride-2
    transposed convolution with ReLU (to 28x28) -> 1x1 convolution with K channels:
    ``[..., 28, 28, K]`` mask *logits*, channel ``k - 1`` for class ``k``.  The loss is a
    per-pixel sigmoid binary cross-entropy on the channel of the ground-truth class only,
    so the classes do not compete for a pixel: Mask R-CNN's key decoupling of mask and
    class prediction (Sec. 3, "L_mask"; Table 2b: +5.5 AP over a softmax over classes).
    Optionally (``pixel_channels > 0``, not in the paper) the head also sees the RoI's own
    pixels, cut from the image at 28x28 like the mask targets: one 3x3 convolution over them
    joins the upsampled features before the 1x1 logits.  The finest FPN map has stride 4,
    coarser than the strokes of a small digit; the pixels give the mask their edges.

Initialisation follows Detectron2: hidden layers He/Xavier, class logits N(0, 0.01^2), box
deltas N(0, 0.001^2), mask logits N(0, 0.001^2), biases 0.  The nearly zero logits make the
initial class loss ``ln(K + 1)`` (a uniform guess) and the initial deltas almost 0.

The heads accept pooled features with any leading shape, e.g. ``[B*R, 7, 7, C]`` or
``[B, R, 7, 7, C]``, and keep it in their outputs.  The losses take flat or batched tensors too.
"""
import keras
import tensorflow as tf

from minimask.boxes import smooth_l1


def _fc_init():
    """Detectron2's ``c2_xavier_fill`` for the fully connected layers: U(-sqrt(3/fan_in), +)."""
    return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="uniform")


def _conv_init():
    """Detectron2's ``c2_msra_fill`` for the convolutions: He normal with fan_out."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def _flatten_leading(x, inner_rank):
    """Merge all leading axes: ``[..., *inner]`` -> (``[N, *inner]``, the leading shape)."""
    leading = tf.shape(x)[: x.shape.rank - inner_rank]
    inner = x.shape[-inner_rank:].as_list()
    return tf.reshape(x, [-1, *inner]), leading


@keras.saving.register_keras_serializable(package="minimask")
class BoxHead(keras.layers.Layer):
    """Box head: pooled features ``[..., 7, 7, C]`` -> (class logits ``[..., K + 1]``, 0 =
    background; class-specific deltas ``[..., K, 4]`` (dy, dx, dh, dw); row ``k - 1``: class ``k``).
    """

    def __init__(self, *, num_classes, fc_width=1024, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1 or fc_width < 1:
            raise ValueError(
                f"num_classes and fc_width must be positive, got {num_classes}, {fc_width}")
        self.num_classes = int(num_classes)
        self.fc_width = int(fc_width)
        self.fc1 = keras.layers.Dense(fc_width, activation="relu", kernel_initializer=_fc_init(),
                                      name="fc1")
        self.fc2 = keras.layers.Dense(fc_width, activation="relu", kernel_initializer=_fc_init(),
                                      name="fc2")
        self.class_logits = keras.layers.Dense(
            num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits")
        self.box_deltas = keras.layers.Dense(
            num_classes * 4, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="box_deltas")

    def build(self, input_shape):
        if len(input_shape) < 4 or None in tuple(input_shape[-3:]):
            raise ValueError(f"BoxHead expects pooled features [..., h, w, C], got {input_shape}")
        h, w, c = input_shape[-3:]
        self.fc1.build((None, h * w * c))
        self.fc2.build((None, self.fc_width))
        self.class_logits.build((None, self.fc_width))
        self.box_deltas.build((None, self.fc_width))

    def call(self, pooled):
        flat, leading = _flatten_leading(pooled, 3)  # [..., h, w, C] -> [N, h, w, C]
        flat = tf.reshape(flat, [tf.shape(flat)[0], -1])  # [N, h, w, C] -> [N, h*w*C]
        hidden = self.fc2(self.fc1(flat))  # [N, fc_width]
        logits = self.class_logits(hidden)  # [N, K+1]
        deltas = self.box_deltas(hidden)  # [N, K*4]
        logits = tf.reshape(logits, tf.concat([leading, [self.num_classes + 1]], 0))  # [..., K+1]
        deltas = tf.reshape(deltas, tf.concat([leading, [self.num_classes, 4]], 0))  # [..., K, 4]
        return logits, deltas

    def compute_output_shape(self, input_shape):
        leading = tuple(input_shape[:-3])
        return leading + (self.num_classes + 1,), leading + (self.num_classes, 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, fc_width=self.fc_width)
        return config


@keras.saving.register_keras_serializable(package="minimask")
class MaskHead(keras.layers.Layer):
    """Mask head: pooled features ``[..., 14, 14, C]`` (and, with ``pixel_channels > 0``, the
    RoI's pixels ``[..., 28, 28, 3]``) -> mask logits ``[..., 28, 28, K]``, channel ``k - 1`` for
    class ``k`` (apply a sigmoid for probabilities)."""

    def __init__(self, *, num_classes, num_convs=4, width=256, pixel_channels=0, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1 or num_convs < 0 or width < 1 or pixel_channels < 0:
            raise ValueError(
                f"need num_classes >= 1, num_convs >= 0, width >= 1, pixel_channels >= 0, got "
                f"{num_classes}, {num_convs}, {width}, {pixel_channels}")
        self.num_classes = int(num_classes)
        self.num_convs = int(num_convs)
        self.width = int(width)  # channels of every conv layer
        self.pixel_channels = int(pixel_channels)  # 0: the paper's head, features only
        self.convs = [
            keras.layers.Conv2D(width, 3, padding="same", activation="relu",
                                kernel_initializer=_conv_init(), name=f"conv{i + 1}")
            for i in range(num_convs)
        ]
        self.upsample = keras.layers.Conv2DTranspose(
            width, 2, strides=2, activation="relu", kernel_initializer=_conv_init(),
            name="upsample")
        self.pixel_conv = None
        if self.pixel_channels:
            self.pixel_conv = keras.layers.Conv2D(
                self.pixel_channels, 3, padding="same", activation="relu",
                kernel_initializer=_conv_init(), name="pixel_conv")
        self.mask_logits = keras.layers.Conv2D(
            num_classes, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="mask_logits")

    def build(self, pooled_shape, pixels_shape=None):
        if len(pooled_shape) < 4 or None in tuple(pooled_shape[-3:]):
            raise ValueError(f"MaskHead expects pooled features [..., h, w, C], got {pooled_shape}")
        h, w, c = pooled_shape[-3:]
        for conv in self.convs:
            conv.build((None, h, w, c))
            c = self.width
        self.upsample.build((None, h, w, c))
        if self.pixel_conv is not None:
            self.pixel_conv.build((None, 2 * h, 2 * w, 3))
        self.mask_logits.build((None, 2 * h, 2 * w, self.width + self.pixel_channels))

    def call(self, pooled, pixels=None):
        x, leading = _flatten_leading(pooled, 3)  # [..., h, w, C] -> [N, h, w, C]
        for conv in self.convs:
            x = conv(x)  # [N, h, w, width]
        x = self.upsample(x)  # [N, 2h, 2w, width]
        if self.pixel_conv is not None:
            if pixels is None:
                raise ValueError("this MaskHead has pixel_channels > 0: call it with the RoIs' pixels too")
            pixels, _ = _flatten_leading(tf.cast(pixels, x.dtype), 3)  # [..., 2h, 2w, 3] -> [N, 2h, 2w, 3]
            x = tf.concat([x, self.pixel_conv(pixels)], axis=-1)  # [N, 2h, 2w, width + pixel_channels]
        logits = self.mask_logits(x)  # [N, 2h, 2w, K]
        return tf.reshape(logits, tf.concat([leading, tf.shape(logits)[1:]], 0))  # [..., 2h, 2w, K]

    def compute_output_shape(self, pooled_shape, pixels_shape=None):
        h, w = pooled_shape[-3:-1]
        return tuple(pooled_shape[:-3]) + (2 * h, 2 * w, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_convs=self.num_convs,
                      width=self.width, pixel_channels=self.pixel_channels)
        return config


# ---------------------------------------------------------------------------
# Losses (pure functions)
# ---------------------------------------------------------------------------


def _gt_class_rows(per_class, class_targets):
    """The row of each RoI's gt class: ``[N, K, ...]``, class ids ``[N]`` (1..K; 0 gives row 0,
    to be masked by the caller) -> ``[N, ...]``."""
    return tf.gather(per_class, tf.maximum(class_targets - 1, 0), axis=1, batch_dims=1)


def box_head_losses(class_logits, box_deltas, class_targets, box_targets, positive, roi_valid,
                    *, smooth_l1_beta=1.0):
    """Box head losses: logits ``[..., K+1]``, deltas ``[..., K, 4]``, class targets int32
    ``[...]``, box targets ``[..., 4]``, bool ``positive``, ``roi_valid [...]`` -> 2 scalars.

    class_loss: softmax cross-entropy averaged over valid RoIs.  box_loss: smooth L1 of the
    gt-class deltas of positive RoIs, summed over the 4 coordinates and divided by the number
    of *valid* RoIs (Detectron2; so it weighs less when there are few positives).  Both are 0
    when there is nothing to average, never NaN.
    """
    num_outputs = class_logits.shape[-1]
    logits = tf.reshape(class_logits, [-1, num_outputs])  # [..., K+1] -> [N, K+1]
    deltas = tf.reshape(box_deltas, [-1, num_outputs - 1, 4])  # [..., K, 4] -> [N, K, 4]
    labels = tf.reshape(tf.cast(class_targets, tf.int32), [-1])  # [N]
    targets = tf.reshape(tf.cast(box_targets, deltas.dtype), [-1, 4])  # [N, 4]
    valid = tf.reshape(tf.cast(roi_valid, logits.dtype), [-1])  # [N]
    positive = tf.reshape(tf.cast(positive, logits.dtype), [-1]) * valid  # [N]
    num_valid = tf.maximum(tf.reduce_sum(valid), 1.0)

    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    class_loss = tf.reduce_sum(cross_entropy * valid) / num_valid

    chosen = _gt_class_rows(deltas, labels)  # [N, 4]
    per_roi = tf.reduce_sum(smooth_l1(chosen - targets, smooth_l1_beta), axis=-1)  # [N]
    box_loss = tf.reduce_sum(per_roi * positive) / num_valid
    return class_loss, box_loss


def mask_loss(mask_logits, mask_targets, class_targets, positive):
    """Mask loss: logits ``[..., m, m, K]``, targets ``[..., m, m]`` in {0, 1}, class targets
    int32 ``[...]``, bool ``positive [...]`` -> scalar.

    Per-pixel sigmoid binary cross-entropy on the channel of each positive RoI's gt class
    only (the other K - 1 channels get no gradient), averaged over the positive RoIs'
    pixels; 0 (with zero, finite gradients) when there is no positive RoI.
    """
    num_classes = mask_logits.shape[-1]
    size_h, size_w = mask_logits.shape[-3], mask_logits.shape[-2]
    logits = tf.reshape(mask_logits, [-1, size_h, size_w, num_classes])  # -> [N, m, m, K]
    targets = tf.reshape(tf.cast(mask_targets, logits.dtype), [-1, size_h, size_w])  # [N, m, m]
    labels = tf.reshape(tf.cast(class_targets, tf.int32), [-1])  # [N]
    positive = tf.reshape(tf.cast(positive, logits.dtype), [-1])  # [N]

    # [N, m, m, K] -> [N, K, m, m] so that the class axis comes right after the RoI axis.
    chosen = _gt_class_rows(tf.transpose(logits, [0, 3, 1, 2]), labels)  # [N, m, m]
    per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=chosen)
    per_roi = tf.reduce_mean(per_pixel, axis=[1, 2])  # [N]
    return tf.reduce_sum(per_roi * positive) / tf.maximum(tf.reduce_sum(positive), 1.0)
