"""Built-ins side by side: NMS, RoIAlign, and the input pipeline against the training step.

* NMS of 6,000 proposals (:func:`bench.bench_rpn.nms_rows`): the from-scratch
  ``minimask.proposals.nms`` (graph, XLA), ``tf.image.non_max_suppression``, its padded
  variant, and the batched ``nms_padded`` with either back-end.  Then the detection layer's
  case, per-class NMS of 8 images x 200 candidates keeping 25: the batched
  ``tf.image.non_max_suppression_padded`` against ``nms_padded`` (one built-in call per image).
* RoIAlign (:func:`bench.bench_roi_align.compare`): the gather implementation, the
  crop_and_resize canvas implementation, and ``tf.image.crop_and_resize`` per level, on the
  same 1,000 RoIs, forward and forward + gradient.
* The data generator (``train.training_batches``, parallel map + prefetch) alone, in images/s,
  against the training step's images/s: the pipeline must be much faster, since in ``fit`` it
  takes its CPU time from the same cores as the step.
"""
import functools

import numpy as np
import tensorflow as tf

from bench import bench_roi_align, bench_rpn
from bench.common import format_table, time_interleaved
from minimask import proposals

DETECTION_CASE = {"batch": 8, "candidates": 200, "kept": 25, "iou": 0.5}


def detection_nms_rows(repeats):
    """The detection layer's NMS: batched padded built-in vs ``nms_padded``, same kept indices."""
    rng = np.random.default_rng(0)
    b, n, d, iou = (DETECTION_CASE[k] for k in ("batch", "candidates", "kept", "iou"))
    centre, size = rng.uniform(0, 128, (b, n, 2)), rng.uniform(8, 40, (b, n, 2))
    shift = rng.integers(1, 11, (b, n, 1)) * 129.0  # the per-class shift of postprocess.detect
    boxes = tf.constant(np.concatenate([centre - size / 2, centre + size / 2], -1) + shift, tf.float32)
    scores = tf.constant(-np.sort(-rng.uniform(0.05, 1.0, (b, n)), axis=1), tf.float32)  # best first
    padded = tf.function(lambda x, s: tf.image.non_max_suppression_padded(
        x, s, d, iou, 0.0, pad_to_max_output_size=True, sorted_input=True))
    ours = tf.function(lambda x, s: proposals.nms_padded(x, s, None, iou, d))
    assert np.array_equal(padded(boxes, scores)[0].numpy(), ours(boxes, scores).indices.numpy())
    timed = time_interleaved({"tf.image.non_max_suppression_padded (batched)": functools.partial(padded, boxes, scores),
                              "proposals.nms_padded (per image built-in)": functools.partial(ours, boxes, scores)},
                             warmup=2, repeats=repeats)
    return [{"task": f"detection NMS {name}", "batch": b, "median_ms": t["median_ms"]} for name, t in timed.items()]


def measure(train_images_per_s, config, warmup=2, repeats=10, pipeline_batches=30):
    from bench.stages import pipeline_ms_per_batch

    nms = bench_rpn.nms_rows(warmup, repeats) + detection_nms_rows(repeats)
    roi_rows, difference, per_level = bench_roi_align.compare(warmup, repeats)
    pipeline = 1000.0 * config.batch_size / pipeline_ms_per_batch(config, pipeline_batches)
    data = {"pipeline_images_per_s": pipeline, "train_images_per_s": train_images_per_s,
            "pipeline_over_train": pipeline / train_images_per_s if train_images_per_s else None}
    return {"nms": nms, "roi_align": roi_rows, "roi_align_max_difference": difference,
            "roi_align_rois_per_level": per_level, "data": data}


def table(result):
    lines = [format_table(result["nms"], [("task", "NMS (6,000 boxes, IoU 0.7, <= 1,000 kept; detection: "
                                                   "8 x 200, IoU 0.5, <= 25)", None),
                                          ("batch", "batch", None), ("median_ms", "median ms", ".2f")]),
             format_table(result["roi_align"], [("method", "RoIAlign, 1,000 RoIs, 8 x 128px, P2-P5 x 64 ch",
                                                 None), ("forward_ms", "forward ms", ".2f"),
                                                ("forward_and_gradient_ms", "fwd+grad ms", ".2f")])
             + f"\n(max |difference| between the three: {result['roi_align_max_difference']:.1e})"]
    data = result["data"]
    ratio = data["pipeline_over_train"]
    lines.append(f"Input pipeline alone {data['pipeline_images_per_s']:.0f} images/s vs training step "
                 + (f"{data['train_images_per_s']:.1f} images/s: {ratio:.0f}x faster, so it takes about "
                    f"{100 / ratio:.0f}% of the CPU time of training." if ratio else "n/a (no training rate)"))
    return "\n".join(lines)
