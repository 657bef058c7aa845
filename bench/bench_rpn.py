"""Benchmark: anchor labelling and non-maximum suppression (minimask vs TensorFlow built-ins).

Setup:
    labelling  ``label_anchors`` of the 50,127 FPN anchors of a 448x448 image (strides 4..64,
               sizes 32..512, ratios 0.5 / 1 / 2) against 20 ground-truth boxes per image, batch
               1 and 8; also the whole target step (label + sample 256 + regression targets).
    NMS        6,000 proposals clustered around 30 objects (sizes 20..200 px in an 800x800 image,
               random scores), IoU threshold 0.7, at most 1,000 kept:
               ``minimask.proposals.nms`` (graph mode and XLA-compiled), ``tf.image.non_max_suppression``,
               ``tf.image.non_max_suppression_padded``, and the padded batched ``nms_padded`` with
               either back-end (what ``propose`` runs) on a batch of 2.
Each in ``tf.function``; the median of ``--repeats`` timed calls after ``--warmup`` untimed ones.
All NMS variants are checked to return the same indices.

Run: ``python -m bench.bench_rpn`` (writes ``bench/results/rpn.json``).
"""
import argparse
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from bench.common import machine, write_results

from minimask import anchors as A
from minimask import proposals as P

IMAGE = (448, 448)
NUM_GT = 20
NUM_PROPOSALS, NMS_THRESHOLD, MAX_KEPT = 6000, 0.7, 1000


def make_gt(batch, seed=0):
    """``[B, 20, 4]`` boxes of 16..256 px (log-uniform) inside the image, all valid."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(16), np.log(256), (batch, NUM_GT, 2)))
    corner = rng.uniform(0, 1, size.shape) * (np.array(IMAGE) - size)
    boxes = np.concatenate([corner, corner + size], axis=-1)
    return tf.constant(boxes, tf.float32), tf.fill([batch], NUM_GT)


def make_proposals(batch, seed=0):
    """``[B, 6000, 4]`` boxes around 30 objects and ``[B, 6000]`` distinct random scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 800, (batch, 30, 2))
    which = rng.integers(0, 30, (batch, NUM_PROPOSALS))
    centre = np.take_along_axis(centres, which[..., None], axis=1)
    centre = centre + rng.normal(0, 20, (batch, NUM_PROPOSALS, 2))
    size = rng.uniform(20, 200, (batch, NUM_PROPOSALS, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    scores = np.stack([rng.permutation(NUM_PROPOSALS) for _ in range(batch)]) / NUM_PROPOSALS
    return tf.constant(boxes, tf.float32), tf.constant(scores, tf.float32)


def time_it(fn, args, warmup, repeats):
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def labelling_rows(anchors, warmup, repeats):
    label = tf.function(lambda gt, n: A.label_anchors(anchors, gt, n))

    @tf.function
    def full_targets(gt, n):
        labels, matched = A.label_anchors(anchors, gt, n)
        labels = A.sample_anchors(labels, 256, 0.5, seed=0)
        return labels, A.rpn_targets(anchors, gt, matched, labels)

    rows = []
    for batch in (1, 8):
        args = make_gt(batch)
        rows.append({"task": "label_anchors", "batch": batch,
                     "median_ms": round(time_it(label, args, warmup, repeats), 2)})
        rows.append({"task": "label + sample + rpn_targets", "batch": batch,
                     "median_ms": round(time_it(full_targets, args, warmup, repeats), 2)})
    return rows


def nms_rows(warmup, repeats):
    boxes, scores = make_proposals(batch=1)
    one_boxes, one_scores = boxes[0], scores[0]

    def padded_builtin(b, s):  # the default threshold: -inf scores would be kept, none here
        return tf.image.non_max_suppression_padded(b, s, MAX_KEPT, NMS_THRESHOLD, pad_to_max_output_size=True)

    single = {
        "minimask nms (graph)": tf.function(lambda b, s: P.nms(b, s, NMS_THRESHOLD, MAX_KEPT)),
        "minimask nms (XLA, jit_compile)": tf.function(lambda b, s: P.nms(b, s, NMS_THRESHOLD, MAX_KEPT),
                                                       jit_compile=True),
        "tf.image.non_max_suppression": tf.function(
            lambda b, s: tf.image.non_max_suppression(b, s, MAX_KEPT, NMS_THRESHOLD)),
        "tf.image.non_max_suppression_padded": tf.function(padded_builtin),
    }
    reference = single["tf.image.non_max_suppression"](one_boxes, one_scores).numpy()
    rows = []
    for name, fn in single.items():
        out = fn(one_boxes, one_scores)
        kept = out[0].numpy()[: int(out[1])] if isinstance(out, tuple) else out.numpy()
        assert np.array_equal(kept, reference), f"{name} disagrees with tf.image.non_max_suppression"
        rows.append({"task": f"NMS {name}", "batch": 1,
                     "median_ms": round(time_it(fn, (one_boxes, one_scores), warmup, repeats), 2)})

    boxes, scores = make_proposals(batch=2, seed=1)
    results = {}
    for use_builtin in (True, False):
        fn = tf.function(
            lambda b, s, u=use_builtin: P.nms_padded(b, s, None, NMS_THRESHOLD, MAX_KEPT, use_builtin=u)
        )
        results[use_builtin] = fn(boxes, scores).indices.numpy()
        back_end = "tf.image.non_max_suppression" if use_builtin else "minimask greedy loop"
        rows.append({"task": f"NMS nms_padded ({back_end})", "batch": 2,
                     "median_ms": round(time_it(fn, (boxes, scores), warmup, repeats), 2)})
    assert np.array_equal(results[True], results[False]), "nms_padded back-ends disagree"
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rpn.json"))
    args = parser.parse_args()

    anchors = A.generate_anchors(IMAGE)
    rows = labelling_rows(anchors, args.warmup, args.repeats) + nms_rows(args.warmup, args.repeats)

    print(f"RPN: {len(anchors)} anchors ({IMAGE[0]}x{IMAGE[1]} FPN) vs {NUM_GT} boxes; NMS of "
          f"{NUM_PROPOSALS} boxes at IoU {NMS_THRESHOLD}, <= {MAX_KEPT} kept; median of {args.repeats}")
    print(f"{'task':56s} {'batch':>5s} {'median ms':>10s}")
    for row in rows:
        print(f"{row['task']:56s} {row['batch']:5d} {row['median_ms']:10.2f}")

    result = {
        "setup": {"image": list(IMAGE), "num_anchors": len(anchors), "num_gt": NUM_GT,
                  "num_proposals": NUM_PROPOSALS, "nms_threshold": NMS_THRESHOLD, "max_kept": MAX_KEPT,
                  "warmup": args.warmup, "repeats": args.repeats, "statistic": "median"},
        "results": rows,
        "machine": machine(),
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
