"""Config variants against the preset, side by side: what a change of config would buy in speed.

``python -m bench --only variants [--variant "max_detections=10" --variant "a=1,b=2" ...]``

Every variant is a model of its own, built in this process with the same seed; all of them
are timed in interleaved rounds on the same fixed batch: one training step
(``model.train_step`` in a ``tf.function``, without the input pipeline) and ``predict_batch``
at batch 8 and 1.  Speed only: whether a variant keeps the quality bars is a training run's
question.  Not part of the default run.
"""
import dataclasses

from bench.common import format_table, time_interleaved

# Candidates measured when no --variant is given: the stages that dominate the stage table
# (mask head, box head) and the precision of the convolutions.
DEFAULT_VARIANTS = ("max_detections=10", "mask_rois_per_image=8", "mask_head_width=32", "box_head_width=128",
                    "rois_per_image=64", "mixed_precision=mixed_bfloat16")


def parse_variant(text, config):
    """``"name=value,name=value"`` -> {name: value} typed like the config's field."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise ValueError(f"unknown config field {name!r} in variant {text!r}")
        kind = type(getattr(config, name))
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return changes


def measure(config, batch, variants=DEFAULT_VARIANTS, repeats=8):
    from bench.bench_model import build_model
    from bench.stages import full_calls

    calls, names = {}, ["preset"] + list(variants)
    for name in names:
        model = build_model(config.replace(**parse_variant(name, config)) if name != "preset" else config)
        full = full_calls(model, batch)
        calls[(name, "train")] = full["full training step"]
        calls[(name, "b8")] = full["full inference"]
        calls[(name, "b1")] = full["inference, batch 1"]
    timed = time_interleaved(calls, warmup=2, repeats=repeats)
    b = int(batch["image"].shape[0])
    rows = []
    for name in names:
        train, b8, b1 = (timed[(name, what)]["median_ms"] for what in ("train", "b8", "b1"))
        rows.append({"variant": name, "train_step_ms": train, "train_images_per_s": 1000.0 * b / train,
                     "predict_b8_ms": b8, "infer_images_per_s_b8": 1000.0 * b / b8,
                     "predict_b1_ms": b1, "infer_images_per_s_b1": 1000.0 / b1})
    base = rows[0]
    for row in rows:
        for key in ("train_images_per_s", "infer_images_per_s_b8", "infer_images_per_s_b1"):
            row[f"{key}_change_percent"] = 100.0 * (row[key] / base[key] - 1.0)
    return {"rows": rows, "repeats": repeats, "batch_size": b}


def table(result):
    return format_table(result["rows"], [
        ("variant", "variant (config change)", None), ("train_images_per_s", "train img/s", ".1f"),
        ("train_images_per_s_change_percent", "%", "+.0f"), ("infer_images_per_s_b8", "infer b8 img/s", ".1f"),
        ("infer_images_per_s_b8_change_percent", "%", "+.0f"), ("infer_images_per_s_b1", "infer b1 img/s", ".1f"),
        ("infer_images_per_s_b1_change_percent", "%", "+.0f")],
        f"Config variants (fixed batch of {result['batch_size']}, no input pipeline; median of "
        f"{result['repeats']} interleaved rounds)")
