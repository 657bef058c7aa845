"""End-to-end speed of the whole model: training and inference images/s, peak memory.

    python -m bench.bench_model [--config mnist] [--steps 40] [--image-size 128] [--out bench/results/model.json]

Training is timed through ``model.fit`` on the real input pipeline (synthetic scenes
generated on the fly), after a warm-up that includes graph tracing (reported apart as
"time to first step").  Inference is ``model.predict_batch`` (the compiled graph: boxes,
classes, scores and box-frame masks) at batch 1 and 8 on held-out scenes, plus the
full-resolution mask pasting of ``model.detect``.  Peak memory is the process's maximum
resident set size (``resource.getrusage``), read after each phase.
"""
import argparse
import resource
import time

import numpy as np


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--out", default="bench/results/model.json")
    args = parser.parse_args(argv)

    import keras

    from bench.common import machine, write_results
    from minimask import config as config_lib
    from minimask import train as train_lib
    from minimask.model import MaskRCNN

    overrides = {"image_size": args.image_size} if args.image_size else {}
    config = config_lib.get_config(args.config, **overrides)
    keras.utils.set_random_seed(0)
    results = {"config": config.name, "image_size": config.image_size, "batch_size": config.batch_size}

    # --- training through model.fit on the real pipeline ---------------------------
    model = MaskRCNN(config).build_all()
    source = train_lib.synthetic_source(config, "train", 10**6, 0)
    batches = train_lib.training_batches(source, config)
    model.compile(optimizer=train_lib.make_optimizer(config, args.warmup + args.steps))
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
    results["time_to_first_step_s"] = round(time.perf_counter() - start, 2)
    model.fit(batches, epochs=1, steps_per_epoch=args.warmup, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=args.steps, verbose=0)
    seconds = time.perf_counter() - start
    results["train_images_per_s"] = round(args.steps * config.batch_size / seconds, 2)
    results["train_step_ms"] = round(1000 * seconds / args.steps, 1)
    results["peak_rss_mb_after_training"] = round(peak_rss_mb(), 0)

    # --- inference ----------------------------------------------------------------
    test = train_lib.synthetic_source(config, "test", 64, 1)
    images = np.stack([test[i]["image"] for i in range(64)])
    for batch_size in (1, 8):
        model.predict_batch(images[:batch_size])  # trace
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < 5.0 or count < 16:
            i = (count * batch_size) % 64
            chunk = images[i:i + batch_size]
            if len(chunk) < batch_size:
                chunk = images[:batch_size]
            model.predict_batch(chunk)
            count += batch_size
        results[f"infer_images_per_s_batch{batch_size}"] = round(count / (time.perf_counter() - start), 2)
    model.detect(images[:8])
    start = time.perf_counter()
    for i in range(0, 64, 8):
        model.detect(images[i:i + 8])
    results["detect_with_pasted_masks_images_per_s_batch8"] = round(64 / (time.perf_counter() - start), 2)
    results["peak_rss_mb"] = round(peak_rss_mb(), 0)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    results["machine"] = machine()
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
