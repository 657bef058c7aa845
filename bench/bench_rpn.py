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
Each in ``tf.function``; the median of ``--repeats`` timed calls after ``--warmup`` untimed ones
(the NMS variants in interleaved rounds, see :mod:`bench.common`).
All NMS variants are checked to return the same indices.

Run: ``python -m bench.bench_rpn`` (writes ``bench/results/rpn.json``).
"""
import argparse
import functools
import os

import numpy as np
import tensorflow as tf

from bench.common import machine, time_interleaved, time_one, write_results

from minimask import anchors as A
from minimask import proposals as P

IMAGE = (448, 448)
NUM_GT = 20
NUM_PROPOSALS, NMS_THRESHOLD, MAX_KEPT = 6000, 0.7, 1000


def make_gt(batch, seed=0, count=NUM_GT, image=IMAGE, sizes=(16, 256)):
    """``[B, count, 4]`` boxes of ``sizes`` px (log-uniform) inside the image, all valid."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1]), (batch, count, 2)))
    corner = rng.uniform(0, 1, size.shape) * (np.array(image) - size)
    boxes = np.concatenate([corner, corner + size], axis=-1)
    return tf.constant(boxes, tf.float32), tf.fill([batch], count)


def make_proposals(batch, seed=0, count=NUM_PROPOSALS):
    """``[B, count, 4]`` boxes around 30 objects and ``[B, count]`` distinct random scores."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 800, (batch, 30, 2))
    which = rng.integers(0, 30, (batch, count))
    centre = np.take_along_axis(centres, which[..., None], axis=1)
    centre = centre + rng.normal(0, 20, (batch, count, 2))
    size = rng.uniform(20, 200, (batch, count, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
    scores = np.stack([rng.permutation(count) for _ in range(batch)]) / count
    return tf.constant(boxes, tf.float32), tf.constant(scores, tf.float32)


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
                     "median_ms": round(time_one(lambda: label(*args), warmup, repeats), 2)})
        rows.append({"task": "label + sample + rpn_targets", "batch": batch,
                     "median_ms": round(time_one(lambda: full_targets(*args), warmup, repeats), 2)})
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
    calls = {}
    for name, fn in single.items():
        out = fn(one_boxes, one_scores)
        kept = out[0].numpy()[: int(out[1])] if isinstance(out, tuple) else out.numpy()
        assert np.array_equal(kept, reference), f"{name} disagrees with tf.image.non_max_suppression"
        calls[(f"NMS {name}", 1)] = functools.partial(fn, one_boxes, one_scores)

    boxes, scores = make_proposals(batch=2, seed=1)
    results = {}
    for use_builtin in (True, False):
        fn = tf.function(
            lambda b, s, u=use_builtin: P.nms_padded(b, s, None, NMS_THRESHOLD, MAX_KEPT, use_builtin=u)
        )
        results[use_builtin] = fn(boxes, scores).indices.numpy()
        back_end = "tf.image.non_max_suppression" if use_builtin else "minimask greedy loop"
        calls[(f"NMS nms_padded ({back_end})", 2)] = functools.partial(fn, boxes, scores)
    assert np.array_equal(results[True], results[False]), "nms_padded back-ends disagree"
    timed = time_interleaved(calls, warmup, repeats)  # interleaved: load bursts hit all alike
    return [{"task": task, "batch": batch, "median_ms": round(timed[(task, batch)]["median_ms"], 2)}
            for task, batch in calls]


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
