"""Feature Pyramid Network: C2..C5 of the backbone -> P2..P6, one map per object scale.

Lin, Dollar, Girshick, He, Hariharan & Belongie, "Feature Pyramid Networks for Object
Detection", CVPR 2017, Sec. 3 and Fig. 3:

* lateral connections: a 1x1 convolution brings every ``Ck`` to ``width`` channels;
* top-down pathway: starting from the coarsest level, the map above is upsampled 2x
  (nearest neighbour, "for simplicity") and ADDED to the lateral map of the level below;
* a 3x3 convolution on each merged map "reduces the aliasing effect of upsampling" and
  gives ``Pk`` (stride ``2**k``, ``width`` channels, no BN, no non-linearity: as in the paper);
* ``P6`` is "a stride two subsampling of P5" (Sec. 4.1), used only by the RPN for the
  largest anchors; like Detectron2 (``LastLevelMaxPool``) it is a 1x1 max pool, stride 2.

Sizes: every level must be exactly twice the size of the level above, or upsampling
cannot line the two maps up. That holds when the image height and width are multiples
of 32 (the stride of C5). minimask never crops or resizes to fix a mismatch silently:
pad the images first with :func:`pad_to_multiple` (bottom and right, so box coordinates
do not change). A static input shape that is not a multiple of 32 raises ValueError when
the model is built; a dynamic one is checked when the model runs (InvalidArgumentError).
"""
import keras
import tensorflow as tf

from minimask import backbone as backbone_lib

SIZE_DIVISIBILITY = 32  # the stride of C5: image sides must be multiples of it
LEVELS = (2, 3, 4, 5)  # FPN levels built from C2..C5; P6 comes on top


def padded_size(size, multiple=SIZE_DIVISIBILITY):
    """The smallest multiple of ``multiple`` that is >= ``size`` (int -> int)."""
    return -(-size // multiple) * multiple


def pad_to_multiple(images, multiple=SIZE_DIVISIBILITY, value=0):
    """Zero-pad images at the bottom and right to sides divisible by ``multiple``.

    ``[B, H, W, C]`` or ``[H, W, C]`` (numpy or tf) -> tf.Tensor ``[(B,) H', W', C]`` with
    ``H' = padded_size(H)``. Boxes (y1, x1, y2, x2) in pixels stay valid unchanged,
    because nothing moves: the padding only adds rows and columns after the image.
    """
    images = tf.convert_to_tensor(images)
    rank = images.shape.rank
    if rank not in (3, 4):
        raise ValueError(f"expected images [H, W, C] or [B, H, W, C], got shape {images.shape}")
    height, width = tf.shape(images)[rank - 3], tf.shape(images)[rank - 2]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    paddings = [[0, pad_h], [0, pad_w], [0, 0]]
    if rank == 4:
        paddings = [[0, 0]] + paddings
    return tf.pad(images, paddings, constant_values=tf.cast(value, images.dtype))


@keras.saving.register_keras_serializable(package="minimask")
class SizeDivisibilityCheck(keras.layers.Layer):
    """Passes images ``[B, H, W, C]`` through unchanged; fails at run time unless H, W % multiple == 0."""

    def __init__(self, *, multiple=SIZE_DIVISIBILITY, **kwargs):
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, images):
        size = tf.shape(images)[1:3]
        check = tf.debugging.assert_equal(
            size % self.multiple, tf.zeros_like(size),
            message=f"image height and width must be multiples of {self.multiple} "
                    "(pad them with minimask.fpn.pad_to_multiple); got [H, W] =")
        with tf.control_dependencies([check]):
            return tf.identity(images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


def _check_static_sizes(c_features):
    """Raise ValueError when known sizes of C(k) are not exactly twice those of C(k+1)."""
    for lower, upper in zip(c_features[:-1], c_features[1:]):
        for axis in (1, 2):
            low, up = lower.shape[axis], upper.shape[axis]
            if low is not None and up is not None and low != 2 * up:
                raise ValueError(
                    f"FPN levels do not line up: a map of size {low} cannot take a 2x upsampled map of "
                    f"size {up} (image sides must be multiples of {SIZE_DIVISIBILITY}; "
                    "pad the images with minimask.fpn.pad_to_multiple)")


def build_fpn(c_features, width=256, *, name="fpn"):
    """Feature pyramid on Keras tensors: ``[C2, C3, C4, C5]`` -> ``[P2, P3, P4, P5, P6]``.

    Each ``Pk`` is ``[B, H/2**k, W/2**k, width]``. Layers are named ``{name}_lateral{k}``,
    ``{name}_upsample{k}``, ``{name}_merge{k}``, ``{name}_smooth{k}``; the outputs "P2".."P6".
    """
    if len(c_features) != len(LEVELS):
        raise ValueError(f"build_fpn needs the 4 maps [C2, C3, C4, C5], got {len(c_features)}")
    _check_static_sizes(c_features)
    laterals = {
        k: keras.layers.Conv2D(width, 1, name=f"{name}_lateral{k}")(c)
        for k, c in zip(LEVELS, c_features)
    }
    # Top-down: M5 = lateral(C5); Mk = lateral(Ck) + upsample2x(M(k+1)).
    merged = {5: laterals[5]}
    for k in (4, 3, 2):
        upsample = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_upsample{k}")
        upsampled = upsample(merged[k + 1])  # [B, h, w, width] -> [B, 2h, 2w, width]
        merged[k] = keras.layers.Add(name=f"{name}_merge{k}")([laterals[k], upsampled])
    pyramid = []
    for k in LEVELS:
        smoothed = keras.layers.Conv2D(width, 3, padding="same", name=f"{name}_smooth{k}")(merged[k])
        pyramid.append(keras.layers.Identity(name=f"P{k}")(smoothed))
    # P6: stride-2 subsampling of P5 (a 1x1 max pool keeps every other cell).
    pyramid.append(keras.layers.MaxPooling2D(pool_size=1, strides=2, name="P6")(pyramid[-1]))
    return pyramid


def build_backbone_fpn(backbone_name, input_shape=(None, None, 3), fpn_width=256, *, weights=None,
                       freeze_stages=0, freeze_batchnorm=False, name="backbone_fpn"):
    """Backbone + FPN as one model: images ``[B, H, W, 3]`` -> ``[P2, P3, P4, P5, P6]``.

    The backbone (``backbone.build_backbone`` with the same keyword arguments) is a nested
    model named after its preset (``model.get_layer("mini_resnet")``), so its weights can
    be saved and loaded on their own. H and W must be multiples of 32 (see module doc).
    """
    height, width = input_shape[0], input_shape[1]
    for side in (height, width):
        if side is not None and side % SIZE_DIVISIBILITY:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {SIZE_DIVISIBILITY}: use "
                f"{padded_size(height or SIZE_DIVISIBILITY)}x{padded_size(width or SIZE_DIVISIBILITY)} "
                "and pad the images with minimask.fpn.pad_to_multiple")
    backbone = backbone_lib.build_backbone(backbone_name, input_shape, weights=weights,
                                           freeze_stages=freeze_stages, freeze_batchnorm=freeze_batchnorm)
    images = keras.Input(shape=input_shape, name="images")
    checked = SizeDivisibilityCheck(multiple=SIZE_DIVISIBILITY, name="size_check")(images)
    pyramid = build_fpn(backbone(checked), width=fpn_width, name="fpn")
    return keras.Model(images, pyramid, name=name)
