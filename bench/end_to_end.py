"""End to end: training and inference images/s, peak memory and time to first step, per image size.

Each image size runs :mod:`bench.bench_model` in a process of its own, so that its peak
memory (the process's maximum resident set size) counts only that model and that size, and
no graph or cache of another section makes it faster or slower.
"""
from bench.common import format_table, run_in_own_process

COLUMNS = [("image_size", "size", None), ("train_images_per_s", "train img/s (b8)", ".1f"),
           ("infer_images_per_s_batch1", "infer img/s b1", ".1f"),
           ("infer_images_per_s_batch8", "infer img/s b8", ".1f"),
           ("detect_with_pasted_masks_images_per_s_batch8", "detect+paste b8", ".1f"),
           ("time_to_first_step_s", "first step s", ".1f"), ("peak_rss_mb_after_training", "peak RSS train MB", ".0f"),
           ("peak_rss_mb", "peak RSS MB", ".0f")]


def run_size(config_name, image_size, steps, warmup, infer_seconds, weights=None):
    """``python -m bench.bench_model`` for one size in a fresh process -> its result dict."""
    return run_in_own_process("bench.bench_model", [
        "--config", config_name, "--image-size", image_size, "--steps", steps, "--warmup", warmup,
        "--infer-seconds", infer_seconds] + (["--weights", weights] if weights else []))


def measure(config_name="mnist", sizes=(128, 256), steps=(40, 12), warmup=3, infer_seconds=4.0, weights=None):
    """One row per image size (``steps[i]`` timed training steps at ``sizes[i]``)."""
    rows = [run_size(config_name, size, n, warmup, infer_seconds, weights) for size, n in zip(sizes, steps)]
    return {"config": config_name, "rows": rows}


def table(result):
    return format_table(result["rows"], COLUMNS, f"End to end, {result['config']} preset (one process per size)")
