"""Backbone: the residual network that turns an image into feature maps C2..C5.

Mask R-CNN (He et al. 2017, Sec. 3) runs every head on features of a "backbone"
convolutional network. minimask builds the residual networks of

* He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
  (ResNet; Table 1 gives the layers of ResNet-18/34/50/101, Fig. 5 the two blocks), and
* Xie, Girshick, Dollar, Tu & He, "Aggregated Residual Transformations for Deep Neural
  Networks", CVPR 2017 (ResNeXt; Fig. 3(c): a bottleneck whose 3x3 convolution is split
  into ``cardinality`` groups).

A ResNet is a stem followed by four stages. Stage ``k`` (k = 2..5) outputs the feature map
``Ck`` with stride ``2**k`` (4, 8, 16, 32 pixels of the image per feature cell); the first
block of stages 3..5 halves the resolution. The Feature Pyramid Network (``fpn.py``)
consumes exactly these four maps.

Output
    ``build_backbone`` returns a ``keras.Model`` whose output is the LIST
    ``[C2, C3, C4, C5]``, float32 ``[B, H/4, W/4, c2]`` ... ``[B, H/32, W/32, c5]``; the
    layers producing them are named ``"C2"`` .. ``"C5"`` (``model.get_layer("C3")``).
Input
    float32 images ``[B, H, W, 3]`` already normalised by :func:`preprocess_images`
    (uint8 -> roughly zero mean, unit variance); H and W should be multiples of 32
    (``fpn.pad_to_multiple``) so that every stage halves the size exactly.
Layer names
    stable and prefixed by stage so that stages can be frozen by name:
    ``stem_conv``, ``stem_bn``, ``stage2_block1_conv1``, ``stage2_block1_bn1``,
    ``stage2_block1_shortcut_conv``, ... (all behind an optional ``name_prefix``).

Where the stride goes (a choice to know about): ``keras.applications.ResNet50`` is the
original Caffe model of He et al. ("ResNet v1"), whose bottleneck puts the stride on the
FIRST 1x1 convolution and whose convolutions have biases. minimask's resnet50/resnet101
match it exactly, so that the ImageNet weights of ``keras.applications`` load into them
(``weights="imagenet"``). torchvision and Detectron2 put the stride on the 3x3
convolution instead ("ResNet v1.5"), which sees more of the input before subsampling;
minimask's ResNeXt and basic-block nets do that (as in Xie et al. and torchvision).
Strided 3x3 convolutions are padded by one pixel on every side (explicit
``ZeroPadding2D``), not by TensorFlow's asymmetric "same" rule, so that feature cell
``i`` of ``Ck`` is centred on image pixel ``i * 2**k`` (see :func:`backbone_geometry`).
"""
import dataclasses
import os
import socket

import keras
import numpy as np
import tensorflow as tf

from minimask import conv

# Keras' ResNet uses this BatchNormalization epsilon; so do we, so that weights transfer exactly.
BN_EPSILON = 1.001e-5

STAGES = (2, 3, 4, 5)
STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}

# Per-channel statistics of ImageNet photos (RGB, on the 0..1 scale), the usual choice
# (torchvision) for bringing uint8 pixels to roughly zero mean and unit variance.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# keras.applications' ResNet ImageNet weights were trained on "caffe" inputs: BGR order,
# 0..255 scale, minus these per-channel means (BGR), no division.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The shape of a residual network; the presets in ``PRESETS`` fill it in."""

    block: str  # "basic" (two 3x3), "bottleneck" (1x1-3x3-1x1) or "resnext" (grouped bottleneck)
    blocks_per_stage: tuple  # number of residual blocks in stages 2, 3, 4, 5
    out_channels: tuple  # channels of C2, C3, C4, C5 (each stage's output)
    inner_channels: tuple = None  # bottleneck/ResNeXt: channels of the 3x3 conv per stage
    cardinality: int = 1  # ResNeXt: number of groups of the 3x3 convolution
    stem: str = "standard"  # "standard": 7x7/2 conv + 3x3/2 max pool; "light": 3x3/2 conv + pool
    stem_channels: int = 64  # channels of the stem convolution
    use_bias: bool = False  # conv biases (True only to match keras.applications' ResNet)
    stride_in_1x1: bool = False  # bottleneck: stride on the first 1x1 (Caffe / Keras) or the 3x3
    imagenet: str = None  # name of the keras.applications model with ImageNet weights, if any


PRESETS = {
    # He et al. 2016, Table 1.
    "resnet18": BackboneConfig("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": BackboneConfig("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": BackboneConfig(
        "bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048), inner_channels=(64, 128, 256, 512),
        use_bias=True, stride_in_1x1=True, imagenet="ResNet50"),
    "resnet101": BackboneConfig(
        "bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048), inner_channels=(64, 128, 256, 512),
        use_bias=True, stride_in_1x1=True, imagenet="ResNet101"),
    # Xie et al. 2017, Table 1: "32x4d" = 32 groups of width 4 in stage 2, doubling per stage.
    "resnext50_32x4d": BackboneConfig(
        "resnext", (3, 4, 6, 3), (256, 512, 1024, 2048), inner_channels=(128, 256, 512, 1024),
        cardinality=32),
    "resnext101_32x8d": BackboneConfig(
        "resnext", (3, 4, 23, 3), (256, 512, 1024, 2048), inner_channels=(256, 512, 1024, 2048),
        cardinality=32),
    # Small nets for 128x128 MNIST scenes that train on a 2-core CPU: basic blocks, one per
    # stage, a light stem; still strides 4/8/16/32. ~0.07 G multiply-adds at 128x128.
    "mini_resnet": BackboneConfig("basic", (1, 1, 1, 1), (32, 64, 128, 256), stem="light", stem_channels=32),
    # Half as wide again, for fast tests.
    "micro_resnet": BackboneConfig("basic", (1, 1, 1, 1), (16, 32, 64, 128), stem="light", stem_channels=16),
}


def preprocess_images(images, mode="standard"):
    """uint8 images ``[..., H, W, 3]`` (RGB) -> float32 tf.Tensor of the same shape, for the backbone.

    mode="standard": ``(x / 255 - mean) / std`` with ImageNet's RGB statistics, roughly
        zero mean and unit variance; what every minimask preset is trained with.
    mode="caffe": BGR order, minus ImageNet's BGR mean, 0..255 scale; what the ImageNet
        weights of keras.applications' ResNet50/101 (``weights="imagenet"``) expect.
    A TensorFlow op (numpy input works too), so the detector can run it inside its graph.
    """
    images = tf.convert_to_tensor(images)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images [..., H, W, 3], got shape {images.shape}")
    x = tf.cast(images, tf.float32)
    if mode == "standard":
        return (x / 255.0 - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STD_RGB)
    if mode == "caffe":
        return x[..., ::-1] - tf.constant(CAFFE_MEAN_BGR)
    raise ValueError(f"mode must be 'standard' or 'caffe', got {mode!r}")


# The detector (model.py) calls it by this name, inside its graph: one function, two names.
normalize_images = preprocess_images


# ----------------------------------------------------------------------------------------
# Building blocks (Keras functional API: each takes a tensor and returns a tensor)
# ----------------------------------------------------------------------------------------

def _conv_bn(x, filters, kernel_size, stride, *, name, conv_name, bn_name, use_bias, groups=1, relu=True):
    """[Zero-pad] -> Conv2D -> BatchNorm [-> ReLU]; a strided k x k conv is padded symmetrically."""
    if stride > 1 and kernel_size > 1:
        # Pad (k-1)/2 on every side, then "valid": centres stay on the grid i * stride.
        x = keras.layers.ZeroPadding2D((kernel_size - 1) // 2, name=f"{name}_pad{conv_name[-1]}")(x)
        padding = "valid"
    else:
        padding = "same"  # stride 1 with an odd kernel: symmetric anyway
    x = keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, groups=groups,
                            use_bias=use_bias, name=f"{name}_{conv_name}")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_{bn_name}")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu{conv_name[-1]}")(x)
    return x


def _shortcut(x, out_channels, stride, *, name, use_bias):
    """Identity, or a 1x1 projection (conv + BN) when the shape changes (He et al. option B)."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    x = keras.layers.Conv2D(out_channels, 1, strides=stride, use_bias=use_bias, name=f"{name}_shortcut_conv")(x)
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_shortcut_bn")(x)


def basic_block(x, filters, stride=1, *, name, use_bias=False):
    """ResNet basic block (He et al. 2016, Fig. 5 left): ``[B,H,W,C] -> [B,H/s,W/s,filters]``.

    relu(x + BN(conv3x3(relu(BN(conv3x3_stride_s(x)))))), with a 1x1 projection of x
    when the shape changes.
    """
    shortcut = _shortcut(x, filters, stride, name=name, use_bias=use_bias)
    y = _conv_bn(x, filters, 3, stride, name=name, conv_name="conv1", bn_name="bn1", use_bias=use_bias)
    y = _conv_bn(y, filters, 3, 1, name=name, conv_name="conv2", bn_name="bn2", use_bias=use_bias, relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def bottleneck_block(x, filters, stride=1, *, name, out_channels=None, groups=1, stride_in_1x1=True,
                     use_bias=True):
    """ResNet bottleneck (He et al. 2016, Fig. 5 right): ``[B,H,W,C] -> [B,H/s,W/s,out_channels]``.

    1x1 conv down to ``filters`` channels, 3x3 conv (in ``groups`` groups), 1x1 conv up to
    ``out_channels`` (default ``4 * filters``); BN after each conv, ReLU after the first
    two and after adding the shortcut. ``stride_in_1x1=True`` is the Caffe / Keras layout.
    """
    out_channels = 4 * filters if out_channels is None else out_channels
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    # The shortcut is created first, as keras.applications does, so that the two models
    # list their layers in the same order (load_imagenet_weights relies on it).
    shortcut = _shortcut(x, out_channels, stride, name=name, use_bias=use_bias)
    y = _conv_bn(x, filters, 1, stride_1x1, name=name, conv_name="conv1", bn_name="bn1", use_bias=use_bias)
    y = _conv_bn(y, filters, 3, stride_3x3, name=name, conv_name="conv2", bn_name="bn2", use_bias=use_bias,
                 groups=groups)
    y = _conv_bn(y, out_channels, 1, 1, name=name, conv_name="conv3", bn_name="bn3", use_bias=use_bias,
                 relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnext_block(x, out_channels, stride=1, *, name, cardinality=32, group_width=4, use_bias=False):
    """ResNeXt block (Xie et al. 2017, Fig. 3(c)): ``[B,H,W,C] -> [B,H/s,W/s,out_channels]``.

    A bottleneck whose 3x3 convolution is split into ``cardinality`` independent groups
    of ``group_width`` channels (``keras.layers.Conv2D(groups=cardinality)``): the same
    cost as one narrower convolution, but more channels. Stride on the 3x3, as in the paper.
    """
    return bottleneck_block(x, cardinality * group_width, stride, name=name, out_channels=out_channels,
                            groups=cardinality, stride_in_1x1=False, use_bias=use_bias)


def stem(x, *, kind="standard", channels=64, use_bias=False, name="stem"):
    """Stem: ``[B,H,W,3] -> [B,H/4,W/4,channels]``.

    "standard" (He et al. 2016, Table 1 "conv1" + pool): 7x7/2 conv, BN, ReLU, 3x3/2 max pool.
    "light": the same with a 3x3/2 conv, ~5x cheaper, for the small presets.
    """
    kernel = {"standard": 7, "light": 3}.get(kind)
    if kernel is None:
        raise ValueError(f"stem kind must be 'standard' or 'light', got {kind!r}")
    x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(channels, kernel, strides=2, use_bias=use_bias, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    # Zero padding is safe before a max pool here: after the ReLU every value is >= 0.
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)


def _block(config, x, stage_index, stride, *, name):
    """One residual block of stage ``stage_index`` (0..3) as the config describes it."""
    out = config.out_channels[stage_index]
    if config.block == "basic":
        return basic_block(x, out, stride, name=name, use_bias=config.use_bias)
    inner = config.inner_channels[stage_index]
    if config.block == "bottleneck":
        return bottleneck_block(x, inner, stride, name=name, out_channels=out,
                                stride_in_1x1=config.stride_in_1x1, use_bias=config.use_bias)
    if config.block == "resnext":
        return resnext_block(x, out, stride, name=name, cardinality=config.cardinality,
                             group_width=inner // config.cardinality, use_bias=config.use_bias)
    raise ValueError(f"unknown block type {config.block!r}")


def _get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_backbone(name, input_shape=(None, None, 3), *, weights=None, freeze_stages=0,
                   freeze_batchnorm=False, name_prefix=""):
    """A residual network: images ``[B, H, W, 3]`` -> list ``[C2, C3, C4, C5]`` (strides 4..32).

    name: a key of ``PRESETS`` ("resnet18", "resnet34", "resnet50", "resnet101",
        "resnext50_32x4d", "resnext101_32x8d", "mini_resnet", "micro_resnet").
    weights: None (random), "imagenet" (resnet50/resnet101 only, copied from
        keras.applications; feed them ``preprocess_images(..., mode="caffe")``), "digits"
        (mini_resnet only: the digit-classification pre-training shipped with the library,
        :data:`DIGITS_WEIGHTS`), or the path of a ``.weights.h5`` file saved from a
        minimask backbone of the same preset.
    freeze_stages: 0 trains everything; k >= 1 freezes the stem and stages 2..k.
    freeze_batchnorm: True puts every BatchNorm layer in inference mode and keeps its
        statistics fixed (sensible with the small batches of detection).
    name_prefix: prepended to every layer name (and to the model's name).
    """
    config = _get_config(name)
    p = name_prefix
    images = keras.Input(shape=input_shape, name=f"{p}images")
    x = stem(images, kind=config.stem, channels=config.stem_channels, use_bias=config.use_bias, name=f"{p}stem")
    features = []
    for i, stage in enumerate(STAGES):
        for block in range(1, config.blocks_per_stage[i] + 1):
            stride = 2 if (block == 1 and stage > 2) else 1  # the stem already brought stride 4
            x = _block(config, x, i, stride, name=f"{p}stage{stage}_block{block}")
        # Name the stage's output C{stage} (an identity layer costs nothing and makes the
        # model's outputs self-describing).
        x = keras.layers.Identity(name=f"{p}C{stage}")(x)
        features.append(x)
    model = keras.Model(images, features, name=f"{p}{name}")

    if weights == "imagenet":
        load_imagenet_weights(model, name)
    elif weights == "digits":
        if name != "mini_resnet":
            raise ValueError(f'weights="digits" exist for mini_resnet only, not {name!r}')
        _load_weights_file(model, DIGITS_WEIGHTS)
    elif weights is not None:
        _load_weights_file(model, weights)
    freeze(model, freeze_stages=freeze_stages, freeze_batchnorm=freeze_batchnorm, name_prefix=name_prefix)
    return model


# ----------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------

def stage_of_layer(layer_name, name_prefix=""):
    """Stage number of a backbone layer from its name: "stem_*" -> 1, "stage3_*" -> 3, else None."""
    if not layer_name.startswith(name_prefix):
        return None
    rest = layer_name[len(name_prefix):]
    if rest.startswith("stem_"):
        return 1
    if rest.startswith("stage") and rest[5:6].isdigit():
        return int(rest[5])
    return None


def _all_layers(model):
    """Every layer of ``model``, looking inside nested models (e.g. the backbone inside backbone + FPN)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def freeze(model, *, freeze_stages=0, freeze_batchnorm=False, name_prefix=""):
    """Make the stem and stages 2..``freeze_stages`` (and optionally every BN) non-trainable; in place.

    Works on a backbone or on any model that contains one (layers are found by name,
    also inside nested models). Layers it does not freeze keep their flag. In Keras 3 a
    BatchNormalization layer with ``trainable = False`` runs in inference mode (moving
    statistics, no updates) even inside ``fit``: that is the "frozen BN" of Detectron2,
    needed when a batch holds only a few images.
    """
    if not 0 <= freeze_stages <= 5:
        raise ValueError(
            f"freeze_stages must be in 0..5 (1 = stem, k = stem and stages 2..k), got {freeze_stages}")
    for layer in _all_layers(model):
        stage = stage_of_layer(layer.name, name_prefix)
        if stage is not None and stage <= freeze_stages:
            layer.trainable = False
        if freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------

# The mini_resnet backbone pre-trained to classify single digits (98.6% on held-out digits),
# shipped with the library; made by ``python -m minimask.pretrain`` (the call lesson 02 makes).
DIGITS_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mini_resnet_digits.weights.h5")


def _load_weights_file(model, path):
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"weights must be None, 'imagenet', 'digits' or a path ending in .weights.h5, got {path!r}")
    if not os.path.exists(path):
        hint = " (make it with: python -m minimask.pretrain)" if path == DIGITS_WEIGHTS else ""
        raise FileNotFoundError(f"backbone weights file not found: {path}{hint}")
    model.load_weights(path)


def _weighted_layers(model):
    """The Conv2D and BatchNormalization layers of a model, in ``model.layers`` order."""
    return [layer for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization))]


def copy_weights_by_sequence(source, target):
    """Copy every Conv2D / BatchNorm weight of ``source`` into ``target``, pairing layers in order.

    The two models must list the same sequence of layer types with identical weight
    shapes (kernel, bias, gamma, beta, moving mean, moving variance); the first mismatch
    raises ValueError naming both layers. Returns the list of (source, target) name pairs.
    """
    source_layers, target_layers = _weighted_layers(source), _weighted_layers(target)
    if len(source_layers) != len(target_layers):
        raise ValueError(f"{source.name} has {len(source_layers)} conv/BN layers, "
                         f"{target.name} has {len(target_layers)}")
    pairs = []
    for s, t in zip(source_layers, target_layers):
        s_shapes = [tuple(w.shape) for w in s.weights]
        t_shapes = [tuple(w.shape) for w in t.weights]
        if type(s) is not type(t) or s_shapes != t_shapes:
            raise ValueError(f"layer {s.name} {type(s).__name__}{s_shapes} does not match "
                             f"{t.name} {type(t).__name__}{t_shapes}")
        t.set_weights(s.get_weights())
        pairs.append((s.name, t.name))
    return pairs


def load_imagenet_weights(model, name, download_timeout=20.0):
    """Load keras.applications' ImageNet weights of ``name`` ("resnet50"/"resnet101") into ``model``.

    Keras downloads them once (~100-170 MB, cached in ~/.keras/models). Without network
    this raises RuntimeError at once. The weights expect ``preprocess_images(mode="caffe")``.
    """
    application = _get_config(name).imagenet
    if application is None:
        with_weights = sorted(n for n, c in PRESETS.items() if c.imagenet)
        raise ValueError(f"no ImageNet weights for {name!r}; only for {with_weights}")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout)  # no endless wait on a dead network
    try:
        source = getattr(keras.applications, application)(include_top=False, weights="imagenet",
                                                          input_shape=(None, None, 3))
    except Exception as error:  # keras' get_file raises a plain Exception on a failed download
        raise RuntimeError(
            f"could not download ImageNet weights for {name} ({error}); "
            "pass weights=None or the path of a local .weights.h5 file") from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
    copy_weights_by_sequence(source, model)


# ----------------------------------------------------------------------------------------
# Geometry and cost
# ----------------------------------------------------------------------------------------

def _main_path_layers(config):
    """Receptive-field specs (see conv.receptive_field) of the longest path, per stage.

    Returns ``{"stem": [...], "C2": [...], ...}``: the layers every pixel goes through on
    the main (non-shortcut) path, which is where the receptive field is largest.
    """
    stem_kernel = 7 if config.stem == "standard" else 3
    paths = {"stem": [dict(kernel=stem_kernel, stride=2, padding=stem_kernel // 2),
                      dict(kernel=3, stride=2, padding=1)]}
    for i, stage in enumerate(STAGES):
        layers = []
        for block in range(1, config.blocks_per_stage[i] + 1):
            stride = 2 if (block == 1 and stage > 2) else 1
            if config.block == "basic":
                layers += [dict(kernel=3, stride=stride, padding=1), dict(kernel=3, padding=1)]
            else:
                s1, s3 = (stride, 1) if config.stride_in_1x1 else (1, stride)
                layers += [dict(kernel=1, stride=s1), dict(kernel=3, stride=s3, padding=1), dict(kernel=1)]
        paths[f"C{stage}"] = layers
    return paths


def backbone_geometry(name):
    """Receptive field of C2..C5 of a preset: name -> ``{"C2": conv.ReceptiveField, ...}``.

    ``jump`` is the stride of the level (4, 8, 16, 32); ``size`` the number of image
    pixels one feature cell can see (the theoretical receptive field; the *effective* one,
    where most of the weight lies, is much smaller: Luo et al. 2016); ``start`` the image
    pixel on which cell 0 is centred (0 for every preset: symmetric padding).
    """
    paths = _main_path_layers(_get_config(name))
    layers, geometry = list(paths["stem"]), {}
    for level in STRIDES:
        layers += paths[level]
        geometry[level] = conv.receptive_field(layers)[-1]
    return geometry


def count_multiply_adds(model):
    """Multiply-adds of one forward pass through the Conv2D and Dense layers of ``model`` (int).

    Nested models (the backbone inside backbone + FPN) are counted too. The model must
    have a static input shape (e.g. ``input_shape=(128, 128, 3)``). FLOPs
    are usually quoted as 2 x multiply-adds. BN, ReLU, pooling and additions are ignored
    (a few percent).
    """
    total = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            out_h, out_w, out_c = layer.output.shape[1:]
            if out_h is None or out_w is None:
                raise ValueError("count_multiply_adds needs a model built with a static input shape")
            kh, kw, in_per_group, _ = layer.kernel.shape
            total += out_h * out_w * out_c * kh * kw * in_per_group  # each output: one dot product
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return int(total)
