"""How the cost grows: with the image size, with the number of objects, with the number of boxes.

* Image size (128, 256, 512, 1024 px square; batch 1): each size runs in a process of its own
  (``python -m bench.scaling --image-size S``, see :func:`worker`), so its memory and graphs
  are its own.  It times every inference stage (as :mod:`bench.stages` does) and the whole
  ``predict_batch`` and ``detect``, and measures the memory of inference: the peak resident
  memory while building the model (inference path only), tracing and running inference,
  minus the resident memory before (TensorFlow loaded, test images made).
  The model is the same at every size (same seed, or the same ``--weights``).
* Objects per image (1, 10, 50 digits; 256x256 canvases of 14-28 px digits so that 50 fit):
  ``predict_batch`` and ``detect`` at batch 1, interleaved over the three counts.
* Boxes: ``anchors.label_anchors`` against 1..100 ground-truth boxes, and NMS
  (``tf.image.non_max_suppression`` and ``proposals.nms_padded``, what the proposal and
  detection layers run) against 500..8000 boxes.

Growth is summarised by the exponent of a log-log fit (``cost ~ size ** exponent``).
"""
import argparse
import functools
import itertools

import numpy as np

from bench.common import (current_rss_mb, describe_growth, format_table, growth_exponent, peak_rss_mb,
                          reset_peak_rss, run_in_own_process, time_interleaved, write_results)

OBJECT_CANVAS = 256
OBJECT_DIGIT_SIZE = (14, 28)


# ------------------------------------------------------------------------ per-size worker
def worker(config_name, image_size, repeats, weights=None, objects=(), scenes_per_count=4):
    """In this process: stage times, whole-inference times and working memory at one size."""
    from bench import bench_model, stages
    from minimask import config as config_lib

    config = config_lib.get_config(config_name, image_size=image_size)
    images, _ = bench_model.scenes(config, 4)
    before = current_rss_mb()  # TensorFlow loaded, no model yet
    reset_peak_rss()
    model = bench_model.build_model(config, weights, inference_only=True)
    calls = stages.inference_calls(model, images[:1])
    calls["whole predict_batch"] = functools.partial(model.predict_batch, images[:1])
    calls["whole detect"] = functools.partial(model.detect, images[:1])
    timed = time_interleaved(calls, warmup=1, repeats=repeats)
    result = {"image_size": image_size, "stage_ms": {k: v["median_ms"] for k, v in timed.items()},
              "inference_memory_mb": peak_rss_mb() - before, "peak_rss_mb": peak_rss_mb()}
    if objects:
        result["objects"] = objects_sweep(model, objects, scenes_per_count, repeats)
    return result


def object_scenes(config, count, scenes):
    """``scenes`` test scenes with exactly ``count`` digits placed (fewer if they do not fit)."""
    from bench.bench_model import scenes as make_scenes

    return make_scenes(config, scenes, seed=2, min_digits=count, max_digits=count, empty_fraction=0.0,
                       digit_size=OBJECT_DIGIT_SIZE, max_overlap=0.5)


def objects_sweep(model, counts, scenes_per_count, repeats):
    """predict_batch and detect at batch 1 per number of digits, interleaved over the counts."""
    calls, instances, detections = {}, {}, {}
    for count in counts:
        images, found = object_scenes(model.config, count, scenes_per_count)
        instances[count] = float(found.mean())
        detections[count] = float(np.mean([len(model.detect(image[None])[0]["boxes"]) for image in images]))
        for what, fn in (("predict", model.predict_batch), ("detect", model.detect)):
            batches = itertools.cycle([image[None] for image in images])
            calls[(what, count)] = lambda fn=fn, batches=batches: fn(next(batches))
    timed = time_interleaved(calls, warmup=1, repeats=repeats * scenes_per_count)
    return [{"objects": count, "mean_instances": instances[count], "mean_detections": detections[count],
             "predict_ms": timed[("predict", count)]["median_ms"],
             "detect_ms": timed[("detect", count)]["median_ms"]} for count in counts]


def run_worker(config_name, image_size, repeats, weights=None, objects=()):
    """:func:`worker` for one size in a fresh process (``python -m bench.scaling``) -> its result."""
    return run_in_own_process("bench.scaling", [
        "--config", config_name, "--image-size", image_size, "--repeats", repeats]
        + (["--weights", weights] if weights else []) + (["--objects", ",".join(map(str, objects))] if objects else []))


# ------------------------------------------------------------------------ boxes
def box_scaling(gt_counts, box_counts, repeats):
    """label_anchors vs number of gt boxes (mnist anchors at 128 and 512, batch 8), and NMS vs
    number of input boxes (batch 1 for the built-in, nms_padded at batch 8)."""
    import tensorflow as tf

    from bench.bench_rpn import make_gt, make_proposals
    from minimask import anchors as anchor_ops
    from minimask import config as config_lib
    from minimask import proposals

    config = config_lib.get_config("mnist")
    calls, sizes = {}, {}
    for side in (128, 512):
        anchors = anchor_ops.generate_anchors((side, side), config.anchor_strides, config.anchor_scales,
                                              config.anchor_ratios)
        label = tf.function(lambda gt, n, anchors=anchors: anchor_ops.label_anchors(anchors, gt, n))
        sizes[side] = len(anchors)
        for count in gt_counts:
            gt = make_gt(8, count=count, image=(side, side), sizes=(12, side // 2))
            calls[(f"label_anchors, {len(anchors)} anchors, batch 8", count)] = functools.partial(label, *gt)
    single = tf.function(lambda b, s: tf.image.non_max_suppression(b, s, 1000, 0.7))
    padded = tf.function(lambda b, s: proposals.nms_padded(b, s, None, 0.7, 1000))
    for count in box_counts:
        boxes, scores = make_proposals(8, count=count)
        calls[("tf.image.non_max_suppression, batch 1", count)] = functools.partial(single, boxes[0], scores[0])
        calls[("proposals.nms_padded, batch 8", count)] = functools.partial(padded, boxes, scores)
    timed = time_interleaved(calls, warmup=1, repeats=repeats)
    rows = []
    for task in dict.fromkeys(task for task, _ in calls):
        counts = [count for t, count in calls if t == task]
        ms = [timed[(task, count)]["median_ms"] for count in counts]
        rows.append({"task": task, "counts": counts, "median_ms": ms, "exponent": growth_exponent(counts, ms)})
    return rows


# ------------------------------------------------------------------------ the section
def measure(config_name="mnist", sizes=(128, 256, 512, 1024), objects=(1, 10, 50), repeats=5, weights=None,
            gt_counts=(1, 10, 50, 100), box_counts=(500, 1000, 2000, 4000, 8000)):
    per_size = [run_worker(config_name, size, repeats, weights, objects if size == OBJECT_CANVAS else ())
                for size in sizes]
    result = {"sizes": [], "stages": {}, "boxes": box_scaling(gt_counts, box_counts, repeats)}
    for entry in per_size:
        result["sizes"].append({"image_size": entry["image_size"], "pixels": entry["image_size"] ** 2,
                                "predict_ms": entry["stage_ms"]["whole predict_batch"],
                                "detect_ms": entry["stage_ms"]["whole detect"],
                                "inference_memory_mb": entry["inference_memory_mb"],
                                "peak_rss_mb": entry["peak_rss_mb"]})
        if "objects" in entry:
            result["objects"] = entry["objects"]
    pixels = [row["pixels"] for row in result["sizes"]]
    large = [i for i, p in enumerate(pixels) if p >= 256 ** 2]  # the target's range, 256..1024
    for stage in per_size[0]["stage_ms"]:
        ms = [entry["stage_ms"][stage] for entry in per_size]
        result["stages"][stage] = {"ms": ms, "exponent_vs_pixels": growth_exponent(pixels, ms),
                                   "exponent_vs_pixels_256_up": growth_exponent([pixels[i] for i in large],
                                                                                [ms[i] for i in large])
                                   if len(large) > 1 else None}
    memory = [row["inference_memory_mb"] for row in result["sizes"]]
    result["memory_exponent_vs_pixels"] = growth_exponent(pixels, np.maximum(memory, 1.0))
    if "objects" in result:
        counts = [row["objects"] for row in result["objects"]]
        detect = [row["detect_ms"] for row in result["objects"]]
        result["objects_exponent"] = growth_exponent(counts, detect)
        result["objects_spread_percent"] = 100.0 * (max(detect) - min(detect)) / min(detect)
    return result


def table(result):
    lines = []
    sizes = result["sizes"]
    stage_rows = [{"stage": stage, **{f"s{row['image_size']}": ms for row, ms in zip(sizes, entry["ms"])},
                   "exponent": entry["exponent_vs_pixels"], "exponent_256": entry["exponent_vs_pixels_256_up"]}
                  for stage, entry in result["stages"].items()]
    columns = ([("stage", "inference, batch 1 (ms)", None)]
               + [(f"s{row['image_size']}", f"{row['image_size']}px", ".1f") for row in sizes]
               + [("exponent", "exp. (pixels)", ".2f"), ("exponent_256", "exp. 256-1024", ".2f")])
    lines.append(format_table(stage_rows, columns, "Scaling with the image size (exponent of a log-log fit "
                                                   "against the pixel count: 1 = linear)"))
    lines.append(format_table(sizes, [("image_size", "size", None), ("inference_memory_mb", "inference memory MB",
                                                                       ".0f"), ("peak_rss_mb", "process peak MB", ".0f")]))
    whole = result["stages"]["whole detect"]
    lines.append("Inference (detect) " + describe_growth(whole["exponent_vs_pixels_256_up"] or whole["exponent_vs_pixels"],
                                                         "the pixel count from 256 to 1024") + "; memory "
                 + describe_growth(result["memory_exponent_vs_pixels"], "the pixel count") + ".")
    worst = max(result["stages"].items(), key=lambda item: item[1]["exponent_vs_pixels"])
    lines.append(f"Steepest stage: {worst[0]} (exponent {worst[1]['exponent_vs_pixels']:.2f}).")
    if "objects" in result:
        lines.append(format_table(result["objects"], [
            ("objects", "digits asked", None), ("mean_instances", "instances", ".1f"),
            ("mean_detections", "detections", ".1f"), ("predict_ms", "predict ms (b1)", ".1f"),
            ("detect_ms", "detect ms (b1)", ".1f")], f"Objects per image ({OBJECT_CANVAS}x{OBJECT_CANVAS} canvas)"))
        lines.append(f"Inference (detect) {describe_growth(result['objects_exponent'], 'the number of objects')}; "
                     f"spread from fewest to most objects {result['objects_spread_percent']:.0f}% (target: within 20%).")
    rows = [{"task": row["task"], **{f"n{c}": ms for c, ms in zip(row["counts"], row["median_ms"])},
             "exponent": row["exponent"]} for row in result["boxes"]]
    for task_rows in (rows[:2], rows[2:]):
        counts = [key for key in task_rows[0] if key.startswith("n")]
        lines.append(format_table(task_rows, [("task", "task (ms)", None)] + [(c, c[1:], ".2f") for c in counts]
                                  + [("exponent", "exponent", ".2f")]))
    for row in result["boxes"]:
        lines.append(f"{row['task']} {describe_growth(row['exponent'], 'the number of boxes')}.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="one image size of the scaling section (a worker)")
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--objects", default="", help="comma-separated digit counts for the objects sweep")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    objects = tuple(int(n) for n in args.objects.split(",") if n)
    write_results(args.out, worker(args.config, args.image_size, args.repeats, args.weights, objects))


if __name__ == "__main__":
    main()
