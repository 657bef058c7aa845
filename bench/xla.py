"""Compiling the graphs: XLA (``jit_compile``), XLA auto-clustering, and ``reduce_retracing``.

Not part of the default run (``python -m bench --only xla``): compiling the whole training
step with XLA takes minutes on 2 cores.

* Which ops XLA cannot compile: ``tf.image.crop_and_resize`` (so the XLA variants use
  ``roi_align_implementation="gather"``) and the ``tf.py_function`` of the NaN guard in
  ``MaskRCNN.train_step`` (so the training variants time a plain step: losses, gradients,
  optimizer update, without the guard).  model.py is not changed: the wrappers are here.
* Inference: the predict function as ``MaskRCNN.predict_batch`` runs it (graph,
  crop_and_resize), the same graph with gather, and gather + ``jit_compile=True``.
* Training: the plain step as a graph (crop_and_resize, and gather) and with
  ``jit_compile=True`` (gather).
* XLA auto-clustering (XLA compiles the clusters it can and leaves crop_and_resize and the
  py_function to TensorFlow): on CPU it must be switched on before TensorFlow starts
  (``TF_XLA_FLAGS="--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"``), so ``bench.bench_model``
  runs in fresh processes with and without it, alternately (A B A B), medians reported.
* ``reduce_retracing``: a predict function called with batches of 1, 8, 3, 8, 1, ...: how many
  traces, the time of the whole sequence (tracing included), and the warm time per batch of 8
  (a graph traced for an unknown batch size may be slower than one for a known size).
Time to first call (tracing + compiling) is reported for each variant.
"""
import functools
import time

import tensorflow as tf

from bench.common import fetch, format_table, time_interleaved


def plain_train_step(model, optimizer):
    """``batch -> total loss``: compute_losses, gradients, optimizer update (no NaN guard)."""
    def step(batch):
        with tf.GradientTape() as tape:
            total = tf.add_n(list(model.compute_losses(batch, training=True, step=optimizer.iterations).values()))
        variables = model.trainable_variables
        grads = tape.gradient(total, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return total
    return step


def _first_call(fn, *args):
    start = time.perf_counter()
    fetch(fn(*args))
    return time.perf_counter() - start


def compile_variants(config, batch, include_train_xla=True):
    """{name: (zero-argument call, seconds of the first call)} for every variant."""
    from bench.bench_model import build_model
    from minimask import train as train_lib

    models = {"crop_and_resize": build_model(config),
              "gather": build_model(config.replace(roi_align_implementation="gather"))}
    images = batch["image"]
    variants = {}

    def add(name, fn, *args):
        variants[name] = (functools.partial(fn, *args), _first_call(fn, *args))

    add("predict, graph (predict_batch)", models["crop_and_resize"].predict_batch, images)
    add("predict, graph (predict_batch), gather", models["gather"].predict_batch, images)
    add("predict, XLA jit_compile, gather", tf.function(lambda x: models["gather"](x), jit_compile=True), images)
    for name, model in models.items():
        optimizer = train_lib.make_optimizer(config, 1000)
        optimizer.build(model.trainable_variables)
        step = plain_train_step(model, optimizer)
        add(f"train step, graph, {name}", tf.function(step), batch)
        if name == "gather" and include_train_xla:
            add("train step, XLA jit_compile, gather", tf.function(step, jit_compile=True), batch)
    return variants


AUTO_CLUSTERING = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"


def auto_clustering(config_name, rounds=2, steps=15):
    """End-to-end speed (``bench.bench_model``) without and with XLA auto-clustering, in fresh
    processes, alternately -> rows with the median of each over ``rounds``."""
    import os
    import statistics

    from bench.common import run_in_own_process

    keys = ("time_to_first_step_s", "train_images_per_s", "infer_images_per_s_batch8", "infer_images_per_s_batch1")
    runs = {False: [], True: []}
    previous = os.environ.get("TF_XLA_FLAGS")
    try:
        for _ in range(rounds):
            for enabled in (False, True):
                if enabled:
                    os.environ["TF_XLA_FLAGS"] = AUTO_CLUSTERING
                elif previous is None:
                    os.environ.pop("TF_XLA_FLAGS", None)
                else:
                    os.environ["TF_XLA_FLAGS"] = previous
                runs[enabled].append(run_in_own_process("bench.bench_model", [
                    "--config", config_name, "--steps", steps, "--warmup", 2, "--infer-seconds", 3]))
    finally:
        if previous is None:
            os.environ.pop("TF_XLA_FLAGS", None)
        else:
            os.environ["TF_XLA_FLAGS"] = previous
    return [{"auto_clustering": enabled, **{k: statistics.median(r[k] for r in runs[enabled]) for k in keys}}
            for enabled in (False, True)]


def retracing(model, images, sequence=(1, 8, 3, 8, 1, 5, 8, 2, 8, 4)):
    """reduce_retracing True vs False on a sequence of batch sizes -> rows."""
    rows, warm = [], {}
    for reduce in (False, True):
        fn = tf.function(lambda x: model(x), reduce_retracing=reduce)
        start = time.perf_counter()
        for size in sequence:
            fetch(fn(images[:size]))
        rows.append({"reduce_retracing": reduce, "traces": fn.experimental_get_tracing_count(),
                     "sequence_s": time.perf_counter() - start})
        warm[reduce] = functools.partial(fn, images[:8])
    timed = time_interleaved(warm, warmup=1, repeats=10)
    for row in rows:
        row["warm_batch8_ms"] = timed[row["reduce_retracing"]]["median_ms"]
    return rows


def measure(config, batch, repeats=10, include_train_xla=True, clustering_rounds=2):
    from bench.bench_model import build_model

    variants = compile_variants(config, batch, include_train_xla)
    timed = time_interleaved({name: call for name, (call, _) in variants.items()}, warmup=1, repeats=repeats)
    rows = [{"variant": name, "first_call_s": first, "median_ms": timed[name]["median_ms"]}
            for name, (_, first) in variants.items()]
    return {"variants": rows, "retracing": retracing(build_model(config), batch["image"]),
            "auto_clustering": auto_clustering(config.name, clustering_rounds) if clustering_rounds else [],
            "batch_size": int(batch["image"].shape[0])}


def table(result):
    return "\n".join([
        format_table(result["variants"], [("variant", f"variant (batch {result['batch_size']})", None),
                                          ("first_call_s", "first call s", ".1f"), ("median_ms", "median ms", ".1f")],
                     "XLA"),
        format_table(result["retracing"], [("reduce_retracing", "reduce_retracing", None), ("traces", "traces", None),
                                           ("sequence_s", "10 calls, batch 1..8 (s)", ".1f"),
                                           ("warm_batch8_ms", "warm ms, batch 8", ".1f")],
                     "Retracing (predict with changing batch sizes)"),
        format_table(result["auto_clustering"], [
            ("auto_clustering", "XLA auto-clustering", None), ("time_to_first_step_s", "first step s", ".1f"),
            ("train_images_per_s", "train img/s", ".1f"), ("infer_images_per_s_batch8", "infer b8 img/s", ".1f"),
            ("infer_images_per_s_batch1", "infer b1 img/s", ".1f")],
            "End to end without / with auto-clustering (fresh processes, A B A B, medians)")])
