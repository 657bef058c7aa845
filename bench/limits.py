"""The physical limit: what this CPU can compute, what the model asks of it, and the share reached.

* Peak: dense float32 matmul (N x N times N x N, 2 N^3 FLOPs) and 3x3 "same" convolutions
  (2 * B * H * W * C_in * C_out * 9 FLOPs), each in a warm ``tf.function``, median of the repeats.
  One large convolution gives the machine's conv peak; one of the mask head's shape (many
  14x14 maps of 64 channels) shows what the model's own convolutions reach.
* The model's FLOPs per image, counted analytically from the layer shapes (2 FLOPs per
  multiply-add): the backbone with :func:`minimask.backbone.count_multiply_adds` (Conv2D and
  Dense layers at the built input size), the FPN as backbone+FPN minus the backbone, the RPN head
  as (cells of P2..P6) x (its three kernels), the box head as RoIs x (its four dense kernels), the
  mask head as RoIs x (each conv's output cells x its kernel; the 2x2 stride-2 transposed conv:
  input cells x kernel), RoIAlign as 4 bilinear taps per sample per channel.  RoIs: at inference
  ``rpn_post_nms_test`` per image in the box head and ``max_detections`` in the mask head; in
  training ``rois_per_image`` and the positive RoIs that train the mask head.  BatchNorm, ReLU,
  additions, losses, NMS and target computation are not counted (a few percent, and not
  multiply-adds).  A training step counts 3x its forward pass (forward, then the gradients with
  respect to the activations and to the weights, each about one forward).
* Share of peak = FLOPs per image x images/s / peak FLOP/s, where the images/s come from the
  full graphs (one training step, the predict graph at batch 8 and 1, on one fixed batch)
  timed in the same interleaved rounds as the peak kernels: on a machine whose load changes
  from minute to minute, numbers taken at different times cannot be divided by each other.
"""
import functools

import numpy as np
import tensorflow as tf

from bench.common import format_table, time_interleaved
from minimask import anchors as anchor_ops
from minimask import backbone as backbone_lib

CONV_SHAPES = {"3x3 conv, 8x56x56, 128->128 ch": (8, 56, 56, 128, 128),
               "3x3 conv, mask head shape 200x14x14, 64->64 ch": (200, 14, 14, 64, 64)}


def peak_calls(matmul_size=1024):
    """{kernel: (zero-argument call, FLOPs)}: a float32 matmul and 3x3 convolutions."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(matmul_size, matmul_size)), tf.float32)
    b = tf.constant(rng.normal(size=(matmul_size, matmul_size)), tf.float32)
    calls = {f"matmul {matmul_size}x{matmul_size}x{matmul_size}": (functools.partial(tf.function(tf.matmul), a, b),
                                                                   2.0 * matmul_size ** 3)}
    conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
    for name, (batch, h, w, c_in, c_out) in CONV_SHAPES.items():
        x = tf.constant(rng.normal(size=(batch, h, w, c_in)), tf.float32)
        k = tf.constant(rng.normal(size=(3, 3, c_in, c_out)), tf.float32)
        calls[name] = (functools.partial(conv, x, k), 2.0 * batch * h * w * c_in * c_out * 9)
    return calls


def _kernel_size(layer):
    return int(np.prod(layer.kernel.shape))


def multiply_adds(model, box_rois, mask_rois):
    """Multiply-adds of one forward pass per image, by stage, with ``box_rois`` RoIs in the box
    head and ``mask_rois`` in the mask head (see the module docstring for how)."""
    c = model.config
    backbone = backbone_lib.count_multiply_adds(model.backbone_fpn.get_layer(c.backbone))
    cells = sum(h * w for h, w in anchor_ops.feature_shapes(model.image_shape, c.anchor_strides))  # P2..P6
    head = model.rpn_head
    box = model.box_head
    mask = model.mask_head
    m = c.mask_pool_size
    samples = c.sampling_ratio ** 2 * 4 * c.fpn_width  # bilinear taps x channels per output cell
    return {
        "backbone": backbone,
        "FPN": backbone_lib.count_multiply_adds(model.backbone_fpn) - backbone,
        "RPN head": cells * sum(_kernel_size(layer) for layer in (head.conv, head.objectness, head.deltas)),
        "RoIAlign": (box_rois * c.box_pool_size ** 2 + mask_rois * m ** 2) * samples,
        "box head": box_rois * sum(_kernel_size(layer) for layer in (box.fc1, box.fc2, box.class_logits,
                                                                      box.box_deltas)),
        "mask head": mask_rois * (m * m * sum(_kernel_size(conv) for conv in mask.convs)
                                  + m * m * _kernel_size(mask.upsample) + (2 * m) ** 2 * _kernel_size(mask.mask_logits)
                                  + ((2 * m) ** 2 * _kernel_size(mask.pixel_conv) if mask.pixel_conv else 0)),
    }


def model_flops(model):
    """GFLOPs per image by stage: inference forward, training forward and training step (3x)."""
    c = model.config
    train_mask_rois = min(c.mask_rois_per_image, int(c.rois_per_image * c.roi_positive_fraction))
    inference = multiply_adds(model, c.rpn_post_nms_test, c.max_detections)
    training = multiply_adds(model, c.rois_per_image, train_mask_rois)
    return [{"stage": stage, "inference_gflop": 2 * inference[stage] / 1e9,
             "training_forward_gflop": 2 * training[stage] / 1e9,
             "training_step_gflop": 3 * 2 * training[stage] / 1e9} for stage in inference]


def measure(model, full, batch_size, repeats=10):
    """Peak kernels and the model's full graphs (``full``: :func:`bench.stages.full_calls`) timed
    in the SAME interleaved rounds, so that the share of the peak compares like with like on a
    machine whose load changes (the input pipeline is not included: it overlaps the step)."""
    peaks = peak_calls()
    work = {"training step": ("full training step", batch_size, "training_step_gflop"),
            f"inference, batch {batch_size}": ("full inference", batch_size, "inference_gflop"),
            "inference, batch 1": ("inference, batch 1", 1, "inference_gflop")}
    calls = {name: fn for name, (fn, _) in peaks.items()}
    calls.update({key: full[key] for key, _, _ in work.values()})
    timed = time_interleaved(calls, warmup=2, repeats=repeats)
    peak_rows = [{"kernel": name, "gflop": flops / 1e9, "median_ms": timed[name]["median_ms"],
                  "gflop_per_s": flops / 1e9 / (timed[name]["median_ms"] / 1000.0)}
                 for name, (_, flops) in peaks.items()]
    peak = max(row["gflop_per_s"] for row in peak_rows)
    flops = model_flops(model)
    per_image = {key: sum(row[key] for row in flops) for key in ("inference_gflop", "training_step_gflop")}
    shares = []
    for name, (key, images, flop_key) in work.items():
        images_per_s = images / (timed[key]["median_ms"] / 1000.0)
        achieved = per_image[flop_key] * images_per_s
        shares.append({"what": name, "images_per_s": images_per_s, "gflop_per_image": per_image[flop_key],
                       "achieved_gflop_per_s": achieved, "share_of_peak_percent": 100.0 * achieved / peak})
    return {"peaks": peak_rows, "peak_gflop_per_s": peak, "flops": flops, "gflop_per_image": per_image,
            "shares": shares, "repeats": repeats}


def table(result):
    lines = [format_table(result["peaks"], [("kernel", "kernel (float32, warm tf.function)", None),
                                            ("gflop", "GFLOP", ".2f"), ("median_ms", "ms", ".1f"),
                                            ("gflop_per_s", "GFLOP/s", ".1f")], "Peak of this machine")]
    total = {"stage": "total", **{k: sum(r[k] for r in result["flops"]) for k in
                                  ("inference_gflop", "training_forward_gflop", "training_step_gflop")}}
    lines.append(format_table(result["flops"] + [total], [
        ("stage", "stage", None), ("inference_gflop", "inference GFLOP/img", ".3f"),
        ("training_forward_gflop", "train fwd GFLOP/img", ".3f"),
        ("training_step_gflop", "train step GFLOP/img (3x)", ".3f")], "Model FLOPs per image (counted)"))
    lines.append(format_table(result["shares"], [
        ("what", "what", None), ("images_per_s", "img/s", ".1f"), ("gflop_per_image", "GFLOP/img", ".3f"),
        ("achieved_gflop_per_s", "GFLOP/s", ".1f"), ("share_of_peak_percent", "% of peak", ".0f")],
        f"Share of the peak ({result['peak_gflop_per_s']:.0f} GFLOP/s): the full graphs on one fixed batch, "
        f"timed in the same {result['repeats']} interleaved rounds as the peak kernels"))
    return "\n".join(lines)
