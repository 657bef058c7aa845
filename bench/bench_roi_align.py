"""Benchmark: RoIAlign on a 4-level FPN, minimask's one-gather op vs tf.image.crop_and_resize.

Setup (the MNIST course model's shapes, scaled to a batch): a batch of 8 images of 128x128,
P2..P5 with 64 channels (32x32 .. 4x4), 1,000 RoIs (125 per image, sizes log-uniform in
8..128 px; s0 = 48 so that every level gets some), 7x7 output, 2x2 samples per bin.

Rows:
    minimask gather  ``multilevel_roi_align`` (default implementation): one gather over all
                     levels at once.
    minimask c&r     ``multilevel_roi_align(implementation="crop_and_resize")``: all levels on
                     one edge-padded canvas, one ``crop_and_resize`` call.
    crop_and_resize  per level: pick the level's RoIs (``tf.dynamic_partition``), edge-pad the
                     map by one cell, ``tf.image.crop_and_resize`` to 14x14 with the boxes
                     mapped so the 14x14 samples are exactly RoIAlign's 2x2-per-bin points,
                     2x2 average pool, ``tf.dynamic_stitch`` back to the input order.  The
                     same numbers as minimask for every RoI (checked below; see the
                     roi_align module docstring), from a fused C++ kernel.
Each in ``tf.function``, forward alone and forward + gradient w.r.t. the four maps; the median
(and min) of ``--repeats`` interleaved rounds after ``--warmup`` untimed calls.  The machine's
load average is saved with the numbers: other processes inflate them.

Run: ``python -m bench.bench_roi_align`` (writes ``bench/results/roi_align.json``).
"""
import argparse
import functools
import os

import numpy as np
import tensorflow as tf

from bench.common import machine, time_interleaved, write_results

from minimask.roi_align import assign_levels, multilevel_roi_align

BATCH, IMAGE, CHANNELS, NUM_ROIS, OUTPUT, SAMPLING = 8, 128, 64, 1000, 7, 2
LEVELS = (2, 3, 4, 5)
CANONICAL_SIZE, CANONICAL_LEVEL = 48.0, 4  # every level gets RoIs: P5 from 96 px


def make_inputs(seed=0):
    """P2..P5 features ``[B, 128 / 2^l, 128 / 2^l, 64]``, boxes ``[B, 125, 4]`` inside the image."""
    rng = np.random.default_rng(seed)
    features = [tf.constant(rng.normal(size=(BATCH, IMAGE >> l, IMAGE >> l, CHANNELS)), tf.float32)
                for l in LEVELS]
    per_image = NUM_ROIS // BATCH
    size = np.exp(rng.uniform(np.log(8), np.log(IMAGE), size=(BATCH, per_image, 2)))
    top_left = rng.uniform(0, 1, size=size.shape) * (IMAGE - size)
    boxes = np.concatenate([top_left, top_left + size], axis=-1)
    return features, tf.constant(boxes, tf.float32)


def minimask_pool(features, boxes, implementation="gather"):
    return multilevel_roi_align(features, boxes, OUTPUT, SAMPLING, aligned=True,
                                canonical_size=CANONICAL_SIZE, canonical_level=CANONICAL_LEVEL,
                                min_level=LEVELS[0], implementation=implementation)


def minimask_canvas_pool(features, boxes):
    return minimask_pool(features, boxes, implementation="crop_and_resize")


def crop_and_resize_pool(features, boxes):
    """The same RoIAlign, with tf.image.crop_and_resize per level (see the module docstring)."""
    batch, num_rois = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(boxes, [-1, 4])  # [B, R, 4] -> [B*R, 4]
    image = tf.repeat(tf.range(batch), num_rois)
    level = assign_levels(flat, LEVELS[0], LEVELS[-1], CANONICAL_SIZE, CANONICAL_LEVEL) - LEVELS[0]
    positions = tf.dynamic_partition(tf.range(tf.shape(flat)[0]), level, len(LEVELS))
    boxes_per_level = tf.dynamic_partition(flat, level, len(LEVELS))
    images_per_level = tf.dynamic_partition(image, level, len(LEVELS))
    grid = OUTPUT * SAMPLING  # 14 evenly spaced samples per axis = RoIAlign's 7 bins x 2
    pooled = []
    for i, (fmap, lboxes, limage) in enumerate(zip(features, boxes_per_level, images_per_level)):
        # One copy of the border all around: RoIAlign's clamp-to-border rule.
        padded = tf.pad(fmap, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        cells = lboxes * 2.0 ** -LEVELS[i] - 0.5 + 1.0  # cell-centre frame of the padded map
        half = (cells[:, 2:] - cells[:, :2]) / grid / 2  # half a sample spacing
        size = tf.cast(tf.shape(padded)[1:3] - 1, tf.float32)
        normalised = tf.concat([cells[:, :2] + half, cells[:, 2:] - half], 1) / tf.tile(size, [2])
        crops = tf.image.crop_and_resize(padded, normalised, limage, (grid, grid))
        pooled.append(tf.nn.avg_pool2d(crops, SAMPLING, SAMPLING, "VALID"))
    out = tf.dynamic_stitch(positions, pooled)  # [B*R, 7, 7, C] in input order
    return tf.reshape(out, [batch, num_rois, OUTPUT, OUTPUT, CHANNELS])


def with_gradient(pool):
    weights = tf.constant(np.random.default_rng(1).normal(
        size=(BATCH, NUM_ROIS // BATCH, OUTPUT, OUTPUT, CHANNELS)), tf.float32)

    def run(features, boxes):
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_sum(pool(features, boxes) * weights)
        return tape.gradient(loss, features)

    return run


def compare(warmup=3, repeats=20):
    """Time the three methods (forward, forward + gradient) -> (rows, max |difference|, RoIs per level)."""
    features, boxes = make_inputs()
    ours, theirs = tf.function(minimask_pool), tf.function(crop_and_resize_pool)
    canvas = tf.function(minimask_canvas_pool)
    levels = assign_levels(boxes, LEVELS[0], LEVELS[-1], CANONICAL_SIZE, CANONICAL_LEVEL).numpy()
    # The three compute the same thing.
    reference = ours(features, boxes).numpy()
    difference = max(float(np.abs(other(features, boxes).numpy() - reference).max())
                     for other in (theirs, canvas))
    methods = {"minimask gather": minimask_pool,
               "minimask crop_and_resize canvas": minimask_canvas_pool,
               "crop_and_resize per level": crop_and_resize_pool}
    calls = {}
    for name, pool in methods.items():
        for kind, fn in (("forward", tf.function(pool)), ("gradient", tf.function(with_gradient(pool)))):
            calls[(name, kind)] = functools.partial(fn, features, boxes)
    timed = time_interleaved(calls, warmup, repeats)
    rows = [{"method": name,
             "forward_ms": round(timed[(name, "forward")]["median_ms"], 2),
             "forward_and_gradient_ms": round(timed[(name, "gradient")]["median_ms"], 2),
             "forward_min_ms": round(timed[(name, "forward")]["min_ms"], 2),
             "forward_and_gradient_min_ms": round(timed[(name, "gradient")]["min_ms"], 2)}
            for name in methods]
    per_level = np.bincount(levels.ravel() - LEVELS[0], minlength=len(LEVELS)).tolist()
    return rows, difference, per_level


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "roi_align.json"))
    args = parser.parse_args()

    rows, difference, per_level = compare(args.warmup, args.repeats)
    print(f"RoIAlign: {NUM_ROIS} RoIs, batch {BATCH}, {IMAGE}x{IMAGE}, P2-P5 x {CHANNELS} ch, "
          f"{OUTPUT}x{OUTPUT} out, {SAMPLING}x{SAMPLING} samples; RoIs per level {per_level}; "
          f"median of {args.repeats}")
    print(f"{'method':32s} {'forward ms':>11s} {'fwd+grad ms':>12s}   (min: fwd, fwd+grad)")
    for row in rows:
        print(f"{row['method']:32s} {row['forward_ms']:11.2f} "
              f"{row['forward_and_gradient_ms']:12.2f}   ({row['forward_min_ms']:.2f}, "
              f"{row['forward_and_gradient_min_ms']:.2f})")
    print(f"max |difference| between the three = {difference:.2e}")

    result = {
        "setup": {"batch": BATCH, "image": IMAGE, "channels": CHANNELS, "num_rois": NUM_ROIS,
                  "output": OUTPUT, "sampling_ratio": SAMPLING, "levels": list(LEVELS),
                  "canonical_size": CANONICAL_SIZE, "rois_per_level": per_level,
                  "warmup": args.warmup, "repeats": args.repeats,
                  "statistic": "median (and min) of interleaved rounds",
                  "load_average_1min": os.getloadavg()[0]},
        "results": rows,
        "max_abs_difference": difference,
        "machine": machine(),
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
