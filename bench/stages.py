"""Where the time goes: the cost of each stage of the model, at inference and in training.

How a stage is timed (``python -m bench --only stages``):

* Every stage is its own ``tf.function`` called on static inputs taken from ONE real batch
  (8 MNIST scenes from the training pipeline): the inputs of a stage are the outputs of the
  stage before, computed once beforehand, so each function does exactly its stage's work.
* Inference: the forward pass of each step of ``MaskRCNN.call``; then the mask pasting of
  ``MaskRCNN.detect`` (eager, per image, as ``detect`` runs it).
* Training: forward AND backward of each stage *in isolation*: the gradient of the sum of the
  stage's outputs (or of its loss) with respect to the stage's trainable weights and its float
  inputs, which is what back-propagation through that stage costs inside the full step.
  Stages without gradient (proposal layer, RoI sampling and targets) run forward only; the
  optimizer update (AdamW + global norm clipping) is a stage of its own.
* The input pipeline is timed alone (batches pulled from ``train.training_batches``).  It runs
  in parallel threads with prefetch while the model computes, so it is NOT part of the sum.
* Check: the sum of the stages is compared with the full graph on the same batch
  (``model.train_step`` in one ``tf.function``, the predict graph) and the gap is reported:
  a dozen separate calls pay a dozen dispatches, and the full graph can overlap independent
  stages on the two cores, so the gap can have either sign.

All calls of one table run in interleaved rounds (see :mod:`bench.common`); medians.
"""
import functools
import time

import keras
import numpy as np
import tensorflow as tf

from bench.common import fetch, format_table, time_interleaved
from minimask import anchors as anchor_ops
from minimask import backbone as backbone_lib
from minimask import fpn as fpn_lib
from minimask import heads as heads_lib
from minimask import postprocess
from minimask import rpn as rpn_lib
from minimask import targets as target_lib
from minimask import train as train_lib

PIPELINE = "input pipeline"
# Table order: the order of the pipeline; a stage missing from one column is not run there.
STAGES = (PIPELINE, "backbone", "FPN", "RPN head", "RPN targets + loss", "proposal layer (NMS)",
          "RoI sampling + targets", "RoIAlign (box 7x7)", "box head", "detection layer (NMS)",
          "RoIAlign (mask 14x14)", "mask head", "mask pasting (detect)", "optimizer update")


def real_batch(config, seed=0):
    """One padded training batch of the config (tensors), from the real input pipeline."""
    source = train_lib.synthetic_source(config, "train", 64, seed)
    return next(iter(train_lib.training_batches(source, config)))


def split_backbone_fpn(model):
    """(backbone: normalised images -> [C2..C5], FPN: [C2..C5] -> [P2..P6]) as two Keras models
    cut out of ``model.backbone_fpn`` (they share its layers and weights)."""
    whole = model.backbone_fpn
    c_maps = [whole.get_layer(f"fpn_lateral{k}").input for k in fpn_lib.LEVELS]  # the FPN's inputs
    return keras.Model(whole.inputs, c_maps), keras.Model(c_maps, whole.outputs)


class _Recorder:
    """Runs each stage once as a ``tf.function`` (tracing it and producing the next stage's
    inputs) and keeps a zero-argument call of it for the timing rounds."""

    def __init__(self):
        self.calls = {}

    def run(self, name, fn, *args):
        graph = tf.function(fn)
        out = graph(*args)
        self.calls[name] = functools.partial(graph, *args)
        return out


def _normalize(model, images):
    return backbone_lib.normalize_images(images, mode=model.config.pixel_normalization)


def _detect(model, class_logits, box_deltas, rois, num_rois):
    c = model.config
    valid = tf.range(tf.shape(rois)[1])[None, :] < num_rois[:, None]
    return postprocess.detect(class_logits, box_deltas, rois, valid, model.image_shape, box_weights=c.box_weights,
                              score_threshold=c.score_threshold, nms_iou=c.detection_nms_iou,
                              max_detections=c.max_detections, pre_nms_top_k=c.detection_pre_nms)


def _mask_inputs(model, features, boxes, images):
    """The mask head's inputs: (pooled features,) and, when the head sees the pixels
    (``mask_head_pixels``), the RoIs' pixels too: both are its RoIAlign stage."""
    pooled = model.mask_pooler(features[:4], boxes)
    if not model.config.mask_head_pixels:
        return (pooled,)
    return pooled, model.roi_pixels(images, boxes)


def paste_all(model, detections):
    """What ``MaskRCNN.detect`` adds to the graph: per image, its valid masks pasted at full size."""
    out = [postprocess.paste_masks(masks[:n], boxes[:n], model.image_shape)
           for masks, boxes, n in zip(detections["masks"], detections["boxes"], detections["num_detections"])]
    return [m.numpy() for m in out]


def inference_calls(model, images):
    """``{stage: zero-argument call}`` for the inference stages on ``images`` uint8 [B, S, S, 3]."""
    backbone, fpn = split_backbone_fpn(model)
    r = _Recorder()
    c_maps = r.run("backbone", lambda x: backbone(_normalize(model, x), training=False), images)
    features = r.run("FPN", lambda c: fpn(c, training=False), c_maps)
    objectness, deltas = r.run("RPN head", lambda p: model.rpn(p), features)
    rois, _, num_rois = r.run("proposal layer (NMS)", lambda o, d: model.proposals(o, d), objectness, deltas)
    pooled = r.run("RoIAlign (box 7x7)", lambda p, b: model.box_pooler(p[:4], b), features, rois)
    logits, box_deltas = r.run("box head", lambda x: model.box_head(x), pooled)
    detections = r.run("detection layer (NMS)", functools.partial(_detect, model), logits, box_deltas, rois,
                       num_rois)
    head_inputs = r.run("RoIAlign (mask 14x14)", functools.partial(_mask_inputs, model), features,
                        detections["boxes"], images)
    masks = r.run("mask head",
                  lambda x, k: postprocess.select_class_masks(tf.sigmoid(model.mask_head(*x)), k),
                  head_inputs, detections["class_ids"])
    detections = fetch({**detections, "masks": masks})
    calls = dict(r.calls)
    calls["mask pasting (detect)"] = functools.partial(paste_all, model, detections)  # eager, as detect()
    return calls


def _forward_backward(fn, variables):
    """``fn(*inputs)`` -> a function returning (outputs, gradient of the sum of the float outputs
    w.r.t. ``variables`` and the float inputs): the stage's share of back-propagation."""
    def run(*inputs):
        floats = [t for t in tf.nest.flatten(inputs) if t.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(floats)
            out = fn(*inputs)
            total = tf.add_n([tf.reduce_sum(o) for o in tf.nest.flatten(out) if o.dtype.is_floating])
        return out, tape.gradient(total, list(variables) + floats)
    return run


def training_calls(model, batch):
    """``{stage: zero-argument call}`` for the training stages (forward + backward) on ``batch``."""
    c = model.config
    backbone, fpn = split_backbone_fpn(model)
    gt_boxes, num_gt, class_ids = batch["boxes"], batch["num_instances"], batch["class_ids"]
    seed = tf.constant([c.seed, 1], tf.int64)
    r = _Recorder()
    c_maps, _ = r.run("backbone", _forward_backward(
        lambda x: backbone(_normalize(model, x), training=True), backbone.trainable_variables), batch["image"])
    features, _ = r.run("FPN", _forward_backward(lambda m: fpn(m, training=True), fpn.trainable_variables),
                        c_maps)
    (objectness, deltas), _ = r.run("RPN head", _forward_backward(
        lambda p: model.rpn(p, training=True), model.rpn_head.trainable_variables), features)

    def rpn_loss(objectness, deltas):
        labels, matched = anchor_ops.label_anchors(
            model.anchors, gt_boxes, num_gt, batch["ignore_boxes"], batch["num_ignore"],
            positive_threshold=c.rpn_positive_iou, negative_threshold=c.rpn_negative_iou)
        labels = anchor_ops.sample_anchors(labels, c.rpn_samples_per_image, c.rpn_positive_fraction, seed=seed)
        return rpn_lib.rpn_losses(objectness, deltas, labels,
                                  anchor_ops.rpn_targets(model.anchors, gt_boxes, matched, labels))

    r.run("RPN targets + loss", _forward_backward(rpn_loss, []), objectness, deltas)
    proposals, _, num_proposals = r.run("proposal layer (NMS)", lambda o, d: model.proposals(o, d, training=True),
                                        objectness, deltas)
    options = dict(num_rois=c.rois_per_image, positive_fraction=c.roi_positive_fraction,
                   positive_iou=c.roi_positive_iou, negative_iou_high=c.roi_positive_iou, mask_size=c.mask_size,
                   box_weights=c.box_weights, seed=seed + 1)
    targets = r.run("RoI sampling + targets", lambda p, n: target_lib.detection_targets(
        p, n, gt_boxes, class_ids, batch["masks"], num_gt, **options), proposals, num_proposals)
    pooled, _ = r.run("RoIAlign (box 7x7)", _forward_backward(lambda p, b: model.box_pooler(p[:4], b), []),
                      features, targets["rois"])

    def box_loss(pooled):
        logits, box_deltas = model.box_head(pooled, training=True)
        return heads_lib.box_head_losses(logits, box_deltas, targets["class_targets"], targets["box_targets"],
                                         targets["positive"], targets["roi_valid"])

    r.run("box head", _forward_backward(box_loss, model.box_head.trainable_variables), pooled)
    # the mask head trains on the first (positive) slots, as MaskRCNN.compute_losses takes them
    count = min(c.mask_rois_per_image, int(c.rois_per_image * c.roi_positive_fraction))
    positives = {key: value[:, :count] for key, value in targets.items()}
    head_inputs, _ = r.run("RoIAlign (mask 14x14)", _forward_backward(functools.partial(_mask_inputs, model), []),
                           features, positives["rois"], batch["image"])

    def mask_loss(head_inputs):
        return heads_lib.mask_loss(model.mask_head(*head_inputs, training=True), positives["mask_targets"],
                                   positives["class_targets"], positives["positive"])

    r.run("mask head", _forward_backward(mask_loss, model.mask_head.trainable_variables), head_inputs)
    r.calls["optimizer update"] = _optimizer_update(model, batch)
    return r.calls


def _optimizer_update(model, batch):
    """A call that applies one fixed set of gradients with a fresh optimizer of the config."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        total = tf.add_n(list(model.compute_losses(batch, training=True).values()))
    grads = tape.gradient(total, variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    optimizer = train_lib.make_optimizer(model.config, 1000)
    optimizer.build([v for _, v in pairs])
    update = tf.function(lambda: optimizer.apply_gradients(pairs))
    update()
    return update


def pipeline_ms_per_batch(config, batches=30):
    """Milliseconds per batch pulled from the training pipeline alone (after it has started)."""
    source = train_lib.synthetic_source(config, "train", 10**6, 0)
    iterator = iter(train_lib.training_batches(source, config))
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return 1000 * (time.perf_counter() - start) / batches


def full_calls(model, batch):
    """The full graphs on the same batch: predict (batch B and 1), detect, one training step."""
    model.compile(optimizer=train_lib.make_optimizer(model.config, 1000))
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step)
    images = batch["image"]
    return {"full inference": functools.partial(model.predict_batch, images),
            "full inference + pasting": functools.partial(model.detect, images),
            "inference, batch 1": functools.partial(model.predict_batch, images[:1]),
            "full training step": functools.partial(step, batch)}


def measure(model, batch, warmup=2, repeats=10, pipeline_batches=30, full=None):
    """Time every stage and the full graphs (``full``: :func:`full_calls`, made here if None)
    -> result dict (rows per stage, sums, measured, gaps)."""
    inference = {f"inference/{k}": v for k, v in inference_calls(model, batch["image"]).items()}
    training = {f"training/{k}": v for k, v in training_calls(model, batch).items()}
    full = full or full_calls(model, batch)
    full = {key: full[key] for key in ("full inference", "full inference + pasting", "full training step")}
    timed = time_interleaved({**inference, **training, **full}, warmup, repeats)
    pipeline = pipeline_ms_per_batch(model.config, pipeline_batches)
    batch_size = int(batch["image"].shape[0])

    rows = []
    for stage in STAGES:
        row = {"stage": stage}
        for mode in ("inference", "training"):
            key = f"{mode}/{stage}"
            row[f"{mode}_ms"] = pipeline if stage == PIPELINE else (
                timed[key]["median_ms"] if key in timed else None)
        rows.append(row)
    result = {"batch_size": batch_size, "image_size": model.config.image_size, "rows": rows}
    for mode, full_key, excluded in (("inference", "full inference + pasting", (PIPELINE,)),
                                     ("training", "full training step", (PIPELINE,))):
        total = sum(row[f"{mode}_ms"] for row in rows if row[f"{mode}_ms"] is not None
                    and row["stage"] not in excluded)
        measured = timed[full_key]["median_ms"]
        result[mode] = {"sum_of_stages_ms": total, "measured_full_ms": measured,
                        "gap_ms": measured - total, "gap_percent": 100.0 * (measured - total) / measured}
        for row in rows:
            if row[f"{mode}_ms"] is not None and row["stage"] not in excluded:
                row[f"{mode}_share"] = 100.0 * row[f"{mode}_ms"] / total
    result["inference"]["measured_predict_graph_ms"] = timed["full inference"]["median_ms"]
    result["repeats"] = repeats
    return result


def table(result):
    b = result["batch_size"]
    columns = [("stage", "stage", None), ("inference_ms", f"inference ms/batch {b}", ".1f"),
               ("inference_share", "%", ".0f"), ("training_ms", f"training ms/batch {b} (fwd+bwd)", ".1f"),
               ("training_share", "%", ".0f")]
    lines = [format_table(result["rows"], columns,
                          f"Stage costs, {result['image_size']}x{result['image_size']}, batch {b} "
                          f"(median of {result['repeats']} interleaved rounds)")]
    for mode in ("inference", "training"):
        m = result[mode]
        lines.append(f"{mode}: sum of stages {m['sum_of_stages_ms']:.1f} ms, measured full graph "
                     f"{m['measured_full_ms']:.1f} ms, gap {m['gap_ms']:+.1f} ms ({m['gap_percent']:+.0f}%)"
                     + (" (input pipeline not in the sum: it overlaps)" if mode == "training" else ""))
    return "\n".join(lines)


def plot(result, path):
    """Stacked bars of the stage costs in ms per image (inference, training) -> ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["batch_size"]
    modes = ("inference", "training")
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(STAGES)))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for x, mode in enumerate(modes):
        bottom = 0.0
        for colour, row in zip(colours, result["rows"]):
            ms = row[f"{mode}_ms"]
            if ms is None or row["stage"] == PIPELINE:
                continue
            ax.bar(x, ms / b, bottom=bottom, color=colour, edgecolor="white",
                   label=row["stage"] if x == 0 or row["inference_ms"] is None else None)
            bottom += ms / b
        measured = result[mode]["measured_full_ms"] / b
        ax.plot([x - 0.4, x + 0.4], [measured] * 2, color="black", linewidth=2,
                label="measured full graph" if x == 0 else None)
    pipeline = result["rows"][0]["training_ms"] / b
    ax.bar(2, pipeline, color=colours[0], label=f"{PIPELINE} (alone; overlaps the step)")
    ax.set_xticks(range(3), ["inference\n(+ mask pasting)", "training step\n(forward + backward)",
                             "input pipeline"])
    ax.set_ylabel("milliseconds per image")
    ax.set_title(f"Where the time goes: minimask {result['image_size']}x{result['image_size']}, batch {b}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
