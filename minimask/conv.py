"""Convolution and pooling in plain numpy, written to be read; and receptive-field arithmetic.

Every feature map in Mask R-CNN comes out of a stack of 2-D convolutions (LeCun et al.
1989) and pooling layers. Keras runs them for us in the real model; this module spells
out what they compute, so that a learner can read one loop and then check (the tests do)
that TensorFlow computes exactly the same numbers.

Shapes follow TensorFlow ("channels last"):
    images   ``x``      ``[H, W, C_in]`` or ``[B, H, W, C_in]``
    kernels  ``kernel`` ``[kh, kw, C_in, C_out]``
    outputs             ``[H_out, W_out, C_out]`` or ``[B, H_out, W_out, C_out]``

Padding follows TensorFlow's rules exactly:
    "valid"  no padding; an output exists only where the whole (dilated) kernel fits.
    "same"   ``H_out = ceil(H / stride)``; the input is zero-padded by
             ``pad_total = max((H_out - 1) * stride + k_eff - H, 0)`` pixels, of which
             ``pad_total // 2`` go at the start and the rest (one more when odd) at the
             end, where ``k_eff = (k - 1) * dilation + 1`` is the dilated kernel size.

Receptive fields (Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional
Neural Networks", Distill 2019) tell which input pixels one output unit can see;
:func:`receptive_field` computes them layer by layer. Later lessons compare them with
the anchor sizes and the object sizes of each feature level.
"""
import collections
import math

import numpy as np

PADDINGS = ("valid", "same")


def _pair(value, what):
    """An int or a pair of ints -> a pair ``(along H, along W)`` of positive ints."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_padding(padding):
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def effective_kernel_size(kernel, dilation=1):
    """Size of a ``kernel``-tap filter spread out by ``dilation``: ``(kernel - 1) * dilation + 1``."""
    return (kernel - 1) * dilation + 1


def conv_output_size(size, kernel, stride=1, padding="valid", dilation=1):
    """Output length of a convolution or pooling along one axis (int -> int).

    "valid": ``floor((size - k_eff) / stride) + 1`` (0 when the kernel does not fit);
    "same":  ``ceil(size / stride)``, whatever the kernel.
    """
    _check_padding(padding)
    if padding == "same":
        return -(-size // stride)  # ceil division on ints
    k_eff = effective_kernel_size(kernel, dilation)
    return max((size - k_eff) // stride + 1, 0)


def same_padding(size, kernel, stride=1, dilation=1):
    """TensorFlow's "same" padding along one axis -> ``(pad_before, pad_after)``.

    The padding is what makes ``ceil(size / stride)`` outputs fit; when it is odd the
    extra pixel goes at the END (TensorFlow's choice; Caffe and PyTorch pad symmetrically).
    """
    out = conv_output_size(size, kernel, stride, "same")
    total = max((out - 1) * stride + effective_kernel_size(kernel, dilation) - size, 0)
    return total // 2, total - total // 2


def _pad(x, window, stride, dilation, padding, value):
    """Pad ``x [B, H, W, C]`` for a window of ``window`` taps -> padded ``x``."""
    if padding == "valid":
        return x
    (top, bottom), (left, right) = [
        same_padding(x.shape[axis], window[i], stride[i], dilation[i]) for i, axis in enumerate((1, 2))
    ]
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _as_batch(x):
    """``[H, W, C]`` or ``[B, H, W, C]`` -> (``[B, H, W, C]``, whether a batch axis was added)."""
    x = np.asarray(x)
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ValueError(f"expected an image [H, W, C] or a batch [B, H, W, C], got shape {x.shape}")


def _windows(x_padded, out_h, out_w, window, stride, dilation):
    """Yield ``(i, j, patch)`` for every output position; ``patch`` is ``[B, kh, kw, C]``.

    Output ``(i, j)`` sees the input rows ``i*stride, i*stride + dilation, ...`` (kh of them)
    and the matching columns: that is the whole definition of a strided, dilated window.
    """
    (kh, kw), (sh, sw), (dh, dw) = window, stride, dilation
    for i in range(out_h):
        for j in range(out_w):
            top, left = i * sh, j * sw
            patch = x_padded[:, top : top + (kh - 1) * dh + 1 : dh, left : left + (kw - 1) * dw + 1 : dw, :]
            yield i, j, patch


def conv2d(x, kernel, bias=None, stride=1, padding="valid", dilation=1, activation=None):
    """2-D convolution (really cross-correlation, as in every deep-learning library).

    ``x [H, W, C_in]`` or ``[B, H, W, C_in]``, ``kernel [kh, kw, C_in, C_out]``,
    ``bias [C_out]`` -> ``[(B,) H_out, W_out, C_out]`` float32.

        out[b, i, j, o] = bias[o] + sum_{u, v, c} x_pad[b, i*s + u*d, j*s + v*d, c] * kernel[u, v, c, o]

    ``stride`` and ``dilation`` are ints or (along H, along W) pairs; ``activation`` is
    None, "relu" or any callable applied elementwise to the result.
    """
    _check_padding(padding)
    x, added_batch = _as_batch(x)
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel must be [kh, kw, C_in={x.shape[3]}, C_out], got shape {kernel.shape}")
    window = kernel.shape[:2]
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    out_h, out_w = [
        conv_output_size(x.shape[1 + a], window[a], stride[a], padding, dilation[a]) for a in (0, 1)
    ]
    x_padded = _pad(x.astype(np.float32), window, stride, dilation, padding, value=0.0)

    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]), np.float32)
    for i, j, patch in _windows(x_padded, out_h, out_w, window, stride, dilation):
        # [B, kh, kw, C_in] . [kh, kw, C_in, C_out] -> [B, C_out]: all channels at once.
        out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    if bias is not None:
        out += np.asarray(bias, np.float32)
    out = _activate(out, activation)
    return out[0] if added_batch else out


def _activate(values, activation):
    if activation is None:
        return values
    if activation == "relu":
        return np.maximum(values, 0.0)
    if callable(activation):
        return activation(values)
    raise ValueError(f"activation must be None, 'relu' or a callable, got {activation!r}")


def _pool(x, pool_size, stride, padding, reduce):
    """Shared loop of the two pooling functions; ``reduce(patch [B,kh,kw,C], valid) -> [B, C]``."""
    _check_padding(padding)
    x, added_batch = _as_batch(x)
    window = _pair(pool_size, "pool_size")
    stride = window if stride is None else _pair(stride, "stride")  # Keras: stride defaults to the pool size
    no_dilation = (1, 1)
    out_h, out_w = [conv_output_size(x.shape[1 + a], window[a], stride[a], padding) for a in (0, 1)]
    x_padded = _pad(x.astype(np.float32), window, stride, no_dilation, padding, value=0.0)
    # 1 where a pixel is real, 0 where it is padding: pooling must know the difference.
    valid = _pad(np.ones_like(x[..., :1], np.float32), window, stride, no_dilation, padding, value=0.0)

    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), np.float32)
    windows = zip(
        _windows(x_padded, out_h, out_w, window, stride, no_dilation),
        _windows(valid, out_h, out_w, window, stride, no_dilation),
    )
    for (i, j, patch), (_, _, valid_patch) in windows:
        out[:, i, j, :] = reduce(patch, valid_patch)
    return out[0] if added_batch else out


def max_pool2d(x, pool_size=2, stride=None, padding="valid"):
    """Max pooling: ``[(B,) H, W, C]`` -> ``[(B,) H_out, W_out, C]`` (the maximum of each window).

    ``stride`` defaults to ``pool_size`` (as in Keras). With "same" padding the padded
    pixels never win: they count as minus infinity, not as zeros.
    """

    def window_max(patch, valid):
        # [B, kh, kw, C] -> [B, C], ignoring padded pixels.
        return np.where(valid > 0, patch, -np.inf).max(axis=(1, 2))

    return _pool(x, pool_size, stride, padding, window_max)


def avg_pool2d(x, pool_size=2, stride=None, padding="valid"):
    """Average pooling: ``[(B,) H, W, C]`` -> ``[(B,) H_out, W_out, C]`` (the mean of each window).

    ``stride`` defaults to ``pool_size``. With "same" padding a window at the border is
    averaged over its REAL pixels only (the padded zeros are not counted), which is what
    ``keras.layers.AveragePooling2D`` and ``tf.nn.avg_pool2d`` do; a convolution with a
    constant ``1/k^2`` kernel would instead count the zeros and darken the border.
    """

    def window_mean(patch, valid):
        # [B, kh, kw, C] -> [B, C]; padded pixels are 0 in `patch` and 0 in `valid`.
        return patch.sum(axis=(1, 2)) / valid.sum(axis=(1, 2))

    return _pool(x, pool_size, stride, padding, window_mean)


# ----------------------------------------------------------------------------------------
# Receptive fields
# ----------------------------------------------------------------------------------------

ReceptiveField = collections.namedtuple("ReceptiveField", ["size", "jump", "start"])
ReceptiveField.__doc__ = """Geometry of one layer's output units, in input-image pixels.

size:  receptive field size r: how many input pixels (along one axis) one unit sees.
jump:  distance j in input pixels between two neighbouring units (the cumulative stride).
start: centre of the receptive field of the FIRST unit (index 0), in pixel indices
       (pixel 0 is centred at 0); unit ``i`` is centred at ``start + i * jump``.
"""


def _layer_spec(layer):
    """``(kernel, stride, dilation[, padding])`` or a dict with those keys -> a dict."""
    if isinstance(layer, dict):
        spec = {"stride": 1, "dilation": 1, "padding": "valid", **layer}
    else:
        layer = tuple(layer)
        if not 1 <= len(layer) <= 4:
            raise ValueError(f"a layer is (kernel, stride, dilation[, padding]), got {layer!r}")
        spec = dict(zip(("kernel", "stride", "dilation", "padding"), layer))
        spec = {"stride": 1, "dilation": 1, "padding": "valid", **spec}
    unknown = set(spec) - {"kernel", "stride", "dilation", "padding", "name"}
    if unknown:
        raise ValueError(f"unknown receptive-field layer keys {sorted(unknown)} in {layer!r}")
    for key in ("kernel", "stride", "dilation"):
        if int(spec[key]) != spec[key] or spec[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {spec[key]!r} in {layer!r}")
    return spec


def _pad_before(spec):
    """Pixels of padding added before the input along one axis for a layer spec."""
    padding = spec["padding"]
    if padding == "valid":
        return 0
    k_eff = effective_kernel_size(spec["kernel"], spec["dilation"])
    if padding == "same":
        # TensorFlow "same" on an input whose size is a multiple of the stride (true for
        # every layer of a backbone fed images padded to a multiple of 32):
        # pad_total = (size/stride - 1) * stride + k_eff - size = k_eff - stride.
        return max(k_eff - spec["stride"], 0) // 2
    if isinstance(padding, (int, np.integer)) and padding >= 0:
        return int(padding)
    raise ValueError(f"padding must be 'valid', 'same' or a number of pixels >= 0, got {padding!r}")


def receptive_field(layers):
    """Receptive field of each layer of a stack: list of layers -> list of ``ReceptiveField``.

    A layer is ``(kernel, stride, dilation)``, optionally with a 4th item ``padding``, or
    a dict ``{"kernel": k, "stride": s, "dilation": d, "padding": p}`` (stride, dilation
    default to 1, padding to "valid"). ``padding`` is "valid" (0), "same" (TensorFlow's
    rule on an input size divisible by the stride: ``(k_eff - s) // 2`` pixels before),
    or an int: the pixels of zero padding added BEFORE the input (e.g. 3 for Keras'
    ``ZeroPadding2D(3)`` in front of ResNet's 7x7 convolution). Padding only moves the
    ``start``; size and jump do not depend on it. Pooling layers count like convolutions.

    The recurrence, starting from the input image (``r = 1, j = 1, start = 0``), with
    ``k_eff = (k - 1) * d + 1``::

        r_out     = r_in + (k_eff - 1) * j_in
        j_out     = j_in * s
        start_out = start_in + ((k_eff - 1) / 2 - pad_before) * j_in

    For example three 3x3 convolutions with stride 1 see 3, 5 and 7 pixels: the
    receptive field grows by ``k - 1`` times the current jump at every layer.
    """
    size, jump, start = 1, 1, 0.0
    fields = []
    for layer in layers:
        spec = _layer_spec(layer)
        k_eff = effective_kernel_size(spec["kernel"], spec["dilation"])
        start = start + ((k_eff - 1) / 2 - _pad_before(spec)) * jump  # uses j_in: update before jump
        size = size + (k_eff - 1) * jump
        jump = jump * spec["stride"]
        fields.append(ReceptiveField(size=size, jump=jump, start=start))
    return fields


def receptive_field_bounds(field, index):
    """Input pixels seen by unit ``index`` of a layer -> ``(first, last)`` (inclusive, may be < 0).

    ``field`` is a :class:`ReceptiveField`; the unit is centred at ``start + index * jump``.
    """
    centre = field.start + index * field.jump
    half = (field.size - 1) / 2
    return int(math.floor(centre - half)), int(math.floor(centre + half))
