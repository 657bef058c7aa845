"""End-to-end speed of the whole model: training and inference images/s, peak memory.

    python -m bench.bench_model [--config mnist] [--steps 40] [--image-size 128] [--weights PATH]
                                [--out bench/results/model.json]

Training is timed through ``model.fit`` on the real input pipeline (synthetic scenes
generated on the fly), after a warm-up that includes graph tracing (reported apart as
"time to first step").  Inference is ``model.predict_batch`` (the compiled graph: boxes,
classes, scores and box-frame masks) at batch 1 and 8 on held-out scenes, plus the
full-resolution mask pasting of ``model.detect``.  Peak memory is the process's maximum
resident set size, read after each phase: run this script in its own process (the suite,
``python -m bench``, does) so that nothing else counts in it.

The helpers here (building a model, copying weights across image sizes, timing inference)
serve the other sections of the suite too.
"""
import argparse
import time

import numpy as np

from bench.common import fetch, machine, peak_rss_mb, write_results


def build_model(config, weights=None, inference_only=False):
    """A built :class:`MaskRCNN` of ``config``; ``weights``: a saved ``.keras`` model (any image
    size) whose weights are copied in, or None for the random initialisation (seed 0).
    ``inference_only`` builds the layers by one inference call instead of ``build_all`` (which
    also runs the training path), so that the process never holds training activations."""
    import keras
    import tensorflow as tf

    from minimask.model import MaskRCNN

    keras.utils.set_random_seed(0)
    model = MaskRCNN(config)
    if inference_only:
        model(tf.zeros([1, config.image_size, config.image_size, 3], tf.uint8))
    else:
        model.build_all()
    if weights:
        copy_weights(keras.saving.load_model(weights), model)
    return model


def copy_weights(source, target):
    """Copy every weight of one MaskRCNN into another of the same layers, at any image size
    (the layers are convolutional or per-RoI, so no weight depends on the image size)."""
    for name in ("backbone_fpn", "rpn_head", "box_head", "mask_head"):
        getattr(target, name).set_weights(getattr(source, name).get_weights())


def scenes(config, count, seed=1, **generator_options):
    """``count`` held-out test scenes of the config's size -> (images uint8 [N, S, S, 3], instance counts [N])."""
    from synthetic_data import MnistDetection

    source = MnistDetection("test", count, seed, image_size=config.image_size, **generator_options)
    samples = [source[i] for i in range(count)]
    return np.stack([s["image"] for s in samples]), np.array([len(s["boxes"]) for s in samples])


def inference_images_per_s(predict, images, batch_size, seconds=5.0, min_images=16):
    """Images/s of ``predict(batch)`` over consecutive batches of ``images`` for at least
    ``seconds`` and ``min_images`` (after one untimed call, which traces)."""
    fetch(predict(images[:batch_size]))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < min_images:
        i = count % (len(images) - batch_size + 1)
        fetch(predict(images[i:i + batch_size]))
        count += batch_size
    return count / (time.perf_counter() - start)


def train_speed(model, config, steps, warmup):
    """``model.fit`` on the real pipeline -> time to first step (tracing), images/s and ms per step."""
    from minimask import train as train_lib

    source = train_lib.synthetic_source(config, "train", 10**6, 0)
    batches = train_lib.training_batches(source, config)
    model.compile(optimizer=train_lib.make_optimizer(config, warmup + steps))
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
    first = time.perf_counter() - start
    model.fit(batches, epochs=1, steps_per_epoch=warmup, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - start
    return {"time_to_first_step_s": round(first, 2),
            "train_images_per_s": round(steps * config.batch_size / seconds, 2),
            "train_step_ms": round(1000 * seconds / steps, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--infer-seconds", type=float, default=5.0, help="timed inference per batch size")
    parser.add_argument("--weights", default=None, help="a saved .keras model to take the weights from")
    parser.add_argument("--out", default="bench/results/model.json")
    args = parser.parse_args(argv)

    from minimask import config as config_lib

    overrides = {"image_size": args.image_size} if args.image_size else {}
    config = config_lib.get_config(args.config, **overrides)
    results = {"config": config.name, "image_size": config.image_size, "batch_size": config.batch_size}

    model = build_model(config, args.weights)
    results.update(train_speed(model, config, args.steps, args.warmup))
    results["peak_rss_mb_after_training"] = round(peak_rss_mb(), 0)

    images, _ = scenes(config, 64)
    for batch_size in (1, 8):
        rate = inference_images_per_s(model.predict_batch, images, batch_size, args.infer_seconds)
        results[f"infer_images_per_s_batch{batch_size}"] = round(rate, 2)
    rate = inference_images_per_s(model.detect, images, 8, args.infer_seconds)
    results["detect_with_pasted_masks_images_per_s_batch8"] = round(rate, 2)
    results["peak_rss_mb"] = round(peak_rss_mb(), 0)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    results["machine"] = machine()
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
