"""Benchmark: how fast are MNIST-detection scenes made?  ``python -m bench.bench_data``.

Training Mask R-CNN on the CPU must not wait for its data.  This script times, on ONE
CPU core (the process is pinned to one core before TensorFlow starts):

* ``MnistDetection[i]`` for 128x128 and 256x256 scenes (drawing + masks + boxes);
* ``export_coco`` (the same plus PNG writing and RLE encoding);
* ``minimask.data.make_dataset`` over the scenes (padded batches through tf.data),
  when that module exists.

It prints a table and writes ``bench/results/data.json``.  Numbers vary with the
machine and its load; compare runs made on the same machine.
"""
import os

# Pin to one core before numpy / TensorFlow start their thread pools (threads inherit it);
# only when run as a script: the suite (python -m bench) imports this module and keeps both cores.
if __name__ == "__main__" and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from synthetic_data import MnistDetection, export_coco  # noqa: E402

RESULTS_FILE = Path(__file__).parent / "results" / "data.json"
# 256x256 scenes scale the digits with the canvas.
SIZES = {128: {"image_size": 128, "digit_size": (14, 64)},
         256: {"image_size": 256, "digit_size": (28, 128)}}


def scenes_per_second(run, count, repeats):
    """Median over ``repeats`` of count / seconds taken by ``run()`` (after one warm-up run)."""
    run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_generator(size, count, repeats):
    dataset = MnistDetection("train", num_scenes=count, seed=0, **SIZES[size])

    def run():
        for i in range(count):
            dataset[i]

    return scenes_per_second(run, count, repeats)


def bench_export(size, count, repeats):
    with tempfile.TemporaryDirectory() as folder:
        return scenes_per_second(
            lambda: export_coco(folder, counts={"train": count}, seed=0, **SIZES[size]),
            count, repeats)


def bench_pipeline(size, count, repeats, batch_size=8, max_instances=8):
    """Scenes/s through minimask.data.make_dataset, or None if it does not exist yet."""
    try:
        from minimask.data import make_dataset
    except ImportError:
        return None
    dataset = MnistDetection("train", num_scenes=count, seed=0, **SIZES[size])
    pipeline = make_dataset(dataset, batch_size, max_instances, shuffle=True, seed=0, repeat=False)

    def run():
        for _ in pipeline:
            pass

    return scenes_per_second(run, count // batch_size * batch_size, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=500, help="scenes per timed run (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default 3)")
    args = parser.parse_args(argv)

    rows = []
    for size in SIZES:
        rows.append(("MnistDetection[i]", size, bench_generator(size, args.count, args.repeats)))
        rows.append(("export_coco (PNG + RLE)", size, bench_export(size, args.count, args.repeats)))
        rows.append(("make_dataset (batch 8)", size, bench_pipeline(size, args.count, args.repeats)))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"MNIST-detection scenes per second ({cores} core, median of {args.repeats} x {args.count})")
    print(f"{'what':<26} {'size':>8} {'scenes/s':>10}")
    for what, size, rate in rows:
        shown = "n/a" if rate is None else f"{rate:10.0f}"
        print(f"{what:<26} {f'{size}x{size}':>8} {shown:>10}")

    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "cores": cores,
        "count": args.count,
        "repeats": args.repeats,
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
        "scenes_per_second": [
            {"what": what, "image_size": size, "scenes_per_second": None if rate is None else round(rate, 1)}
            for what, size, rate in rows
        ],
    }
    RESULTS_FILE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"written {RESULTS_FILE}")


if __name__ == "__main__":
    main()
