"""Diagnostics: one-call sanity checks of a Mask R-CNN set-up, from the talk's "lessons learned".

The talk the course follows (Schwalbe 2018, "Lessons learned I" and "II") closes with advice
that every Mask R-CNN project learns the hard way.  Each check below turns one piece of it
into a tool that a user runs on *their own* config and data:

=====================================================  =========================================
lesson learned (talk)                                  check
=====================================================  =========================================
double-check dimensions and formats; document them     :func:`check_box_convention`,
                                                       :func:`check_dataset`
always have a look at all input data                   :func:`draw_training_targets`
convolution is geometric: draw windows and strides     :func:`check_receptive_field`,
against the object sizes                               :func:`check_anchor_coverage`
check your loss values; does the model get better?     :func:`check_initial_losses`,
                                                       :func:`check_overfit`,
                                                       :func:`check_learning_rate`
mind your RAM when generating data                     :func:`measure_pipeline_memory`
=====================================================  =========================================

Every check returns a small dataclass (a :class:`CheckResult`): ``ok``, the numbers it
measured, the ``problems`` (they make ``ok`` False) and ``warnings`` (worth a look, not
wrong) it found, and a ``verdict``: the text it prints (``verbose=False`` keeps it quiet).
Every threshold is a module constant with the reason for its value next to it.

Boxes are float32 ``(y1, x1, y2, x2)`` in continuous pixels (:mod:`minimask.boxes`); boxes
given to the anchor and receptive-field checks must be in the frame the model sees, i.e.
after the letterbox resize to ``config.image_size`` (:func:`collect_boxes` does that).
"""
import contextlib
import dataclasses
import io
import math
import os
import resource
import tracemalloc

import keras
import numpy as np
import tensorflow as tf

from minimask import anchors as anchor_ops
from minimask import backbone as backbone_lib
from minimask import data as data_lib
from minimask import train as train_lib
from minimask import visualize
from minimask.boxes import area, boxes_from_masks, coco_xywh_to_yxyx, iou
from minimask.config import Config
from minimask.model import STAGES, MaskRCNN

# ---------------------------------------------------------------------------
# Thresholds (each with its reason)
# ---------------------------------------------------------------------------

# Initial losses.  Every classifier of minimask starts with logits close to 0 (biases 0, weights
# N(0, 0.01^2); see rpn.RPNHead and heads.py), so at initialization:
#   rpn_class = ln 2 (sigmoid at 0: p = 1/2), class = ln(K + 1) (uniform softmax), mask = ln 2.
# Tolerances, in nats: measured deviations at initialization are below 0.003 for the two sigmoid
# losses and below 0.1 for the softmax (presets "mnist" and the test config, 3 seeds each).
# 0.05 nats on a sigmoid loss is an objectness bias of about 0.2 (p = 0.55 instead of 0.5);
# 0.25 nats on the softmax lets the random spread through while a class bias of a few nats
# (p(one class) = 0.99 at the start) moves the loss by more than 1.
INITIAL_LOSS_TOLERANCE = {"rpn_class": 0.05, "class": 0.25, "mask": 0.05}
# The box losses have no "expected" value (they depend on the data), but at initialization the
# deltas are about 0, so the loss is the size of the targets.  RPN positives overlap their box
# at IoU >= 0.7 (targets of a few tenths), head positives at IoU >= 0.5 with weights (10, 10, 5, 5):
# losses above these bounds mean targets far from their anchors / RoIs, e.g. boxes in another
# unit or convention.
SANE_INITIAL_BOX_LOSS = {"rpn_box": 1.0, "box": 2.0}

# Overfitting one batch ("overfit one batch", Karpathy 2019, "A recipe for training neural
# networks"): a model that cannot memorise a handful of objects will not learn a data set.
# A loss counts as "near zero" when the median of its last OVERFIT_WINDOW steps is below:
#   rpn_class 0.05 (7% of ln 2: p = 0.95 on the true label), class 0.1 (4% of ln 11),
#   mask 0.15 (22% of ln 2: the 28x28 targets of thin strokes, cut from RoIs that move as the
#   proposals change, are the slowest to memorise; measured 0.04-0.13 after 300 steps),
#   rpn_box 0.02 (unweighted deltas: about 1% of the anchor size per coordinate) and box 0.1
#   (deltas weighted 10, 10, 5, 5: again about 1% of the RoI size).  Both start near 0 (tiny initial
#   deltas; the gt boxes are among the RoIs), so only an absolute bound makes sense.
OVERFIT_THRESHOLDS = {"rpn_class": 0.05, "rpn_box": 0.02, "class": 0.1, "box": 0.1, "mask": 0.15}
# Anchors and RoIs are re-sampled at every step, so single steps are noisy: judge a median.
OVERFIT_WINDOW = 20
OVERFIT_LEARNING_RATE = 1e-3  # Adam, the usual choice for this check (no schedule, no decay)

# Learning rate: the total loss of the last LR_WINDOW steps may not exceed the first step's by
# this factor (a stable learning rate makes the loss fall, or at worst wobble, on one batch).
LR_WINDOW = 5
LR_MAX_GROWTH = 1.5

# Anchor coverage.  A box whose best anchor IoU is below rpn_negative_iou (0.3) gets its only
# positive anchor from the "low-quality match" rule (anchors.label_anchors): an anchor that the
# IoU rule alone would call background, and a long regression to travel.  The course anchors
# leave 0-4% of the MNIST digits in that state, anchors 2x too large 13-35%, 4x too large 86%.
MAX_WEAK_SHARE = 0.10
# Only a warning: more than half the boxes below rpn_positive_iou (they rely on the best-match rule).
# Normal for thin objects (the course anchors: 70% of the MNIST digits), worth a look elsewhere.
WARN_UNCOVERED_SHARE = 0.5
# The suggestions tried when coverage is poor: (scales per level, anchor size / stride).
SUGGESTION_GRID = ((1, 8.0), (2, 8.0), (3, 8.0), (1, 4.0), (2, 4.0), (3, 4.0))

# Receptive field and stride.  An object smaller (sqrt of its area) than the anchor stride can
# sit between anchor centres: a box one stride wide centred between four centres reaches IoU
# 0.14 with the best anchor of its own size.  More than this share of such boxes is a problem.
MAX_SMALL_SHARE = 0.05
RPN_CONV_KERNEL = 3  # the RPN's sliding window (rpn.RPNHead) and FPN's smoothing conv are 3x3

# Box convention: a box "matches" its mask when its IoU with the mask's tight box reaches the
# RPN's own positive threshold: that tolerates about a pixel of annotation slack on a 10-pixel
# object, while a transposed box off the diagonal overlaps its mask far less.
MASK_MATCH_IOU = 0.7

# Pipeline memory: after a warm-up (tf.data buffers, allocator pools, caches), memory should be
# flat.  A leak of one 128x128x3 image per sample is 48 KiB per sample, so a slope above
# 2 KiB per sample is a leak (of ~1/25 image per sample) or a growing cache.  A leak grows all the
# time, while the allocator also grows in one-off steps (tf.data over the MNIST generator: +20 MiB
# once after ~7000 samples, then flat up to 20000): so the slope must exceed the limit in BOTH
# halves of the run after the warm-up.  Two measures: the
# RSS (what the OS charges the process; it also sees TensorFlow's C++ buffers, but the allocator
# reuses freed pages before it asks for new ones, so a leak can hide in it for a while), and, for the
# plain source, the Python heap traced by tracemalloc (numpy arrays included), which shows a
# Python-side leak at once.  (Not under tf.data: its threads allocate numpy arrays outside Python's
# control, and stopping tracemalloc meanwhile can crash CPython < 3.12.9, gh-128679.)
MEMORY_WARMUP_FRACTION = 0.25
MAX_GROWTH_KIB_PER_SAMPLE = 2.0


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    """What every check returns: ``ok`` (no problems), its ``verdict`` text, ``problems``, ``warnings``."""

    ok: bool
    verdict: str
    problems: list
    warnings: list

    def __str__(self):
        return self.verdict


@dataclasses.dataclass
class InitialLossResult(CheckResult):
    losses: dict  # name -> measured loss at initialization
    expected: dict  # name -> (expected value, tolerance), for the classification losses
    objectness_logit_mean: float  # mean initial RPN logit over all anchors (expected about 0)
    class_probabilities: np.ndarray = dataclasses.field(repr=False)  # [K+1] mean softmax at the gt boxes


@dataclasses.dataclass
class OverfitResult(CheckResult):
    steps_run: int
    initial: dict  # name -> loss at the first step
    final: dict  # name -> median loss over the last OVERFIT_WINDOW steps
    thresholds: dict
    failed: list  # names of the losses that did not fall near zero
    history: dict = dataclasses.field(repr=False)  # train.StepLog history: "step" and each loss, per step


@dataclasses.dataclass
class LearningRateResult(CheckResult):
    learning_rate: float
    steps_run: int
    nonfinite_step: object  # int step of the first non-finite loss or gradient, or None
    nonfinite_terms: list  # the loss terms that were not finite at that step ("(a gradient)" if none)
    weights_finite: bool  # every weight finite after the run: the guard kept the bad step out
    bad_batch_path: object
    history: dict = dataclasses.field(repr=False)


@dataclasses.dataclass
class AnchorCoverageResult(CheckResult):
    uncovered_share: float  # boxes whose best anchor IoU < rpn_positive_iou
    weak_share: float  # boxes whose best anchor IoU < rpn_negative_iou
    mean_best_iou: float
    buckets: list  # anchors.anchor_coverage buckets, each with its "weak_share" added
    suggested_scales: object  # a better anchor_scales, or None when coverage is fine
    suggested_coverage: object  # {"weak_share", "uncovered_share", "mean_best_iou"} of the suggestion


@dataclasses.dataclass
class ReceptiveFieldResult(CheckResult):
    levels: list  # per pyramid level: stride (network, config), receptive field, anchors, its boxes
    small_share: float  # boxes smaller (sqrt area) than the finest anchor stride
    size_percentiles: dict  # {0, 5, 50, 95, 100} -> box size sqrt(area)


@dataclasses.dataclass
class BoxConventionResult(CheckResult):
    num_boxes: int
    inverted: np.ndarray  # indices of boxes with y2 < y1 or x2 < x1
    empty: np.ndarray  # indices of boxes with zero height or width (or non-finite)
    outside: np.ndarray  # indices of boxes outside the image
    mismatched: np.ndarray  # indices of boxes that do not match their mask's tight box
    match_share: object  # share of boxes matching their mask (None without masks)
    interpretation: str  # the reading of the 4 numbers that fits the masks best


@dataclasses.dataclass
class DatasetResult(CheckResult):
    num_images: int
    num_objects: int
    empty_images: list  # indices of images without objects
    class_histogram: np.ndarray  # [K + 1] objects per class id (index 0 must stay 0)
    degenerate: list  # (image index, row) of empty / inverted / non-finite boxes
    unknown_classes: list  # (image index, row, class id) outside 1..K
    mismatched: list  # (image index, row) boxes that do not match their mask
    image_sizes: dict  # (H, W) -> number of images


@dataclasses.dataclass
class MemoryResult(CheckResult):
    curves: dict  # pipeline -> {"samples": [...], "rss_mib": [...], "traced_mib": [...] or None}
    growth_mib: dict  # pipeline -> RSS growth after the warm-up, MiB
    slope_kib_per_sample: dict  # pipeline -> RSS slope after the warm-up (the smaller of its two halves)
    traced_slope_kib_per_sample: dict  # "source" -> the same for the traced Python heap (not under tf.data)


def _finish(result_type, title, problems, warnings, lines, verbose, **numbers):
    """Build the verdict text, print it if ``verbose``, and return the result."""
    text = [f"{title}: {'PASS' if not problems else 'FAIL'}"]
    text += [f"  PROBLEM: {p}" for p in problems]
    text += [f"  warning: {w}" for w in warnings]
    text += [f"  {line}" for line in lines]
    verdict = "\n".join(text)
    if verbose:
        print(verdict)
    return result_type(ok=not problems, verdict=verdict, problems=list(problems), warnings=list(warnings),
                       **numbers)


# ---------------------------------------------------------------------------
# Batches and models
# ---------------------------------------------------------------------------


def _as_batch(batch, config):
    """A padded batch dict (numpy or tensors) or a list of samples -> a padded numpy batch."""
    if isinstance(batch, (list, tuple)):
        batch = data_lib.collate(batch, config.max_instances, config.max_ignore, truncate=True)
    if not isinstance(batch, dict) or "num_instances" not in batch:
        raise ValueError("expected a padded batch (a dict with num_instances, see minimask.data.collate) "
                         "or a list of samples")
    batch = {key: np.asarray(value) for key, value in batch.items()}
    size = config.image_size
    if batch["image"].shape[1:] != (size, size, 3):
        raise ValueError(f"the batch images are {list(batch['image'].shape[1:])} but the model takes "
                         f"[{size}, {size}, 3]: resize them with minimask.data.letterbox first")
    return batch


def _valid_rows(batch):
    """bool ``[B, M]``: the rows of a padded batch that hold an object."""
    rows = batch["boxes"].shape[1]
    return np.arange(rows)[None, :] < batch["num_instances"][:, None]


def _label_problems(batch, num_classes):
    """Problems with the class ids, counts and boxes of a padded batch (valid rows only).

    Returns ``(problems, fatal)``: ``fatal`` when the losses cannot even be computed (class ids
    past K make the softmax cross-entropy fail, counts past the padded rows read garbage).
    """
    problems = []
    rows = batch["boxes"].shape[1]
    counts = batch["num_instances"]
    if np.any(counts < 0) or np.any(counts > rows):
        problems.append(f"num_instances {counts.tolist()} outside 0..{rows} (the padded rows)")
        return problems, True
    valid = _valid_rows(batch)
    ids = batch["class_ids"][valid]
    if np.any(ids == 0):
        problems.append(
            f"{int(np.sum(ids == 0))} objects have class id 0, the background: object classes are 1..K. "
            "Labels shifted by one (0-based ids)? For MNIST scenes class id = digit + 1")
    outside = np.unique(ids[(ids < 0) | (ids > num_classes)])
    fatal = bool(len(outside))
    if fatal:
        problems.append(
            f"class ids {outside.tolist()} are outside 1..K = 1..{num_classes}: labels shifted by one, "
            "or config.num_classes too small")
    boxes = batch["boxes"][valid]
    bad = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if np.any(bad):
        problems.append(f"{int(bad.sum())} object boxes are empty, inverted or not finite "
                        "(y2 <= y1 or x2 <= x1): see check_box_convention")
    return problems, fatal


def _built_model(model_or_config, seed):
    """A MaskRCNN: the given one (built if needed), or a fresh one of the given Config."""
    if isinstance(model_or_config, Config):
        keras.utils.set_random_seed(seed)
        return MaskRCNN(model_or_config).build_all()
    if not isinstance(model_or_config, MaskRCNN):
        raise ValueError(f"expected a minimask MaskRCNN or a Config, got {type(model_or_config).__name__}")
    if not model_or_config.mask_head.built:
        model_or_config.build_all()
    return model_or_config


def _training_copy(model_or_config, seed):
    """A model to train in a check: a fresh one for a Config, else a copy of the model with the
    same weights, the same frozen weights and the same stage (the user's model stays untouched)."""
    if isinstance(model_or_config, Config):
        return _built_model(model_or_config, seed)
    model = _built_model(model_or_config, seed)
    copy = MaskRCNN(model.config).build_all()
    copy.set_weights(model.get_weights())
    trainable = {id(v) for v in model.trainable_variables}
    # Same construction, same weight order: carry over which weights train (frozen heads, stages).
    for source, target in zip(model.weights, copy.weights):
        target.trainable = id(source) in trainable
    copy.stage = model.stage
    copy.proposal_model = model.proposal_model
    return copy


def _train_on_one_batch(model, batch, optimizer, steps, stop_when=None, bad_batch_path=None):
    """Run ``model.train_step`` (with its NaN guard) on the same batch up to ``steps`` times.

    Returns ``(log, steps_run)``: the :class:`minimask.train.StepLog` that watched the steps (its
    ``history`` holds each step's losses; on a non-finite step it stopped the loop and wrote its
    ``message``) and the number of steps run, the skipped non-finite one included.
    ``stop_when(history)`` may end the loop early.
    """
    model.bad_batch_path = bad_batch_path
    model.compile(optimizer=optimizer, jit_compile=False)
    optimizer.build(model.trainable_variables)  # built here, not inside the traced step: one trace
    # autograph=False: train_step uses explicit tf.cond and no Python control flow on tensors,
    # and skipping autograph's source transformation makes the trace several times faster.
    step = tf.function(model.train_step, autograph=False)
    log = train_lib.StepLog()  # the training's own bookkeeping: per-step losses, stop on non-finite
    log.set_model(model)
    model.stop_training = False
    model.nonfinite_step = None
    tensors = {key: tf.convert_to_tensor(value) for key, value in batch.items()}
    steps_run = 0
    for i in range(int(steps)):
        step(tensors)
        steps_run += 1
        with contextlib.redirect_stdout(io.StringIO()):  # the checks word their own verdict
            log.on_train_batch_end(i)
        if model.stop_training or (stop_when is not None and stop_when(log.history)):
            break
    return log, steps_run


# ---------------------------------------------------------------------------
# Losses at initialization
# ---------------------------------------------------------------------------


def expected_initial_losses(num_classes):
    """The classification losses of an untrained model: ``{"rpn_class": ln 2, "class": ln(K+1), "mask": ln 2}``."""
    return {"rpn_class": math.log(2.0), "class": math.log(num_classes + 1.0), "mask": math.log(2.0)}


def _initial_outputs(model, batch):
    """Mean RPN logit over all anchors, and mean softmax ``[K+1]`` of the box head at the gt boxes."""
    features = model.features(tf.convert_to_tensor(batch["image"]), training=False)
    objectness, _ = model.rpn(features)  # [B, A]
    class_logits, _ = model.box_branch(features, tf.convert_to_tensor(batch["boxes"], tf.float32))  # [B, M, K+1]
    probabilities = tf.nn.softmax(class_logits).numpy()[_valid_rows(batch)]  # [objects, K+1]
    mean_probabilities = probabilities.mean(axis=0) if len(probabilities) else None
    return float(tf.reduce_mean(objectness)), mean_probabilities


def check_initial_losses(model, batch, *, verbose=True):
    """Losses of an untrained model against their expected values: MaskRCNN (or Config), padded batch -> result.

    At initialization the RPN objectness loss should be ln 2, the classifier's ln(K + 1) and
    the mask loss ln 2 (:func:`expected_initial_losses`, tolerances ``INITIAL_LOSS_TOLERANCE``),
    and the box losses finite and below ``SANE_INITIAL_BOX_LOSS``.  A classification loss far
    from its value means logits that do not start near 0 (a large bias or initializer) or labels
    that are not what the loss expects; the batch's class ids are checked first (1..K on valid
    rows).  ``batch`` is a padded batch (:func:`minimask.data.collate`) or a list of samples.
    """
    model = _built_model(model, seed=0)
    config = model.config
    batch = _as_batch(batch, config)
    problems, fatal = _label_problems(batch, config.num_classes)
    expected = expected_initial_losses(config.num_classes)
    expected = {name: (value, INITIAL_LOSS_TOLERANCE[name]) for name, value in expected.items()}
    lines, warnings = [], []
    numbers = dict(losses={}, expected=expected, objectness_logit_mean=float("nan"), class_probabilities=None)
    if fatal:  # report the labels instead of crashing in the loss
        return _finish(InitialLossResult, "check_initial_losses", problems, warnings,
                       ["losses not computed: fix the labels first"], verbose, **numbers)
    if not np.any(batch["num_instances"]):
        warnings.append("the batch has no objects: the box and mask losses are 0 and say little")

    tensors = {key: tf.convert_to_tensor(value) for key, value in batch.items()}
    losses = {name: float(value) for name, value in model.compute_losses(tensors, training=False).items()}
    logit_mean, probabilities = _initial_outputs(model, batch)
    numbers.update(losses=losses, objectness_logit_mean=logit_mean, class_probabilities=probabilities)
    wanted = STAGES[model.stage]["losses"]
    has_objects = bool(np.any(batch["num_instances"]))
    for name in wanted:
        value = losses[name]
        if name == "mask" and not has_objects:  # no positive RoI: the loss is defined as 0
            lines.append(f"{name:9s} {value:.4f}  (no objects: 0)")
            if value != 0.0:
                problems.append(f"mask = {value} on a batch without objects: it must be 0")
        elif not np.isfinite(value):
            problems.append(f"{name} is {value} at initialization")
        elif name in expected:
            target, tolerance = expected[name]
            line = f"{name:9s} {value:.4f}  expected {target:.4f} +- {tolerance}"
            if abs(value - target) > tolerance:
                problems.append(f"{name} = {value:.3f}, expected {target:.3f} +- {tolerance}: "
                                + _initial_loss_hint(name, value, target, logit_mean, probabilities, config))
            lines.append(line)
        else:
            limit = SANE_INITIAL_BOX_LOSS[name]
            lines.append(f"{name:9s} {value:.4f}  finite and below {limit}")
            if value > limit:
                problems.append(f"{name} = {value:.3f} > {limit} at initialization: the box targets are far "
                                "from their anchors / RoIs; are the boxes in pixels of the model input and "
                                "(y1, x1, y2, x2)? (see check_box_convention)")
    lines.append(f"mean initial objectness logit {logit_mean:+.3f} (expected about 0, p = 0.5)")
    return _finish(InitialLossResult, "check_initial_losses", problems, warnings, lines, verbose, **numbers)


def _initial_loss_hint(name, value, target, logit_mean, probabilities, config):
    """Why a classification loss may be off at initialization, from the measured logits."""
    if name == "rpn_class":
        p = 1.0 / (1.0 + math.exp(-logit_mean))
        return (f"the objectness logits start at {logit_mean:+.2f} on average (p(object) = {p:.2f}, expected "
                "0 and 0.5): check the RPN head's bias (0) and initializer (std 0.01)"
                + ("; a loss below ln 2 means the model already tells objects from background: is it trained?"
                   if value < target else ""))
    if name == "class" and probabilities is not None:
        k = int(np.argmax(probabilities))
        uniform = 1.0 / len(probabilities)
        if probabilities[k] > 2.0 * uniform:
            return (f"at the gt boxes class {k} ({config.class_names[k]}) gets p = {probabilities[k]:.2f} on "
                    f"average instead of 1/(K+1) = {uniform:.2f}: the class-logit bias or weights start large")
        return ("the predicted classes are close to uniform, so the labels must be off: "
                "are the class ids 1..K with 0 the background?")
    return f"the {name} logits do not start near 0: check that layer's bias and initializer"


# ---------------------------------------------------------------------------
# Training on one batch: overfitting and the learning rate
# ---------------------------------------------------------------------------


def _nonfinite_terms(model):
    """The loss terms of the model's last step that were not finite (a gradient if none was)."""
    values = {name: float(v.numpy()) for name, v in model.last_losses.items()}
    return [name for name, v in values.items() if not np.isfinite(v)] or ["(a gradient)"]


def _nonfinite_text(model, bad_batch_path):
    saved = f"; the batch is saved in {bad_batch_path}" if bad_batch_path else ""
    return (f"non-finite loss at step {model.nonfinite_step}: {', '.join(_nonfinite_terms(model))}; the NaN guard "
            f"skipped that step (the weights are those of step {model.nonfinite_step - 1}){saved}")


def _median_last(history, name, window):
    values = history[name][-window:]
    return float(np.median(values)) if values else float("nan")


def _all_below(history, names, thresholds, window):
    if len(history["step"]) < window:
        return False
    return all(_median_last(history, name, window) < thresholds[name] for name in names)


def _frozen_groups(model):
    """Names of the layer groups (rpn head, box head, mask head, backbone) without trainable weights."""
    groups = {"backbone + FPN": model.backbone_fpn, "RPN head": model.rpn_head, "box head": model.box_head,
              "mask head": model.mask_head}
    return [name for name, layer in groups.items() if not layer.trainable_variables]


_LOSS_OWNER = {"rpn_class": "RPN head", "rpn_box": "RPN head", "class": "box head", "box": "box head",
               "mask": "mask head"}


def check_overfit(model_or_config, batch, steps=300, *, learning_rate=OVERFIT_LEARNING_RATE,
                  thresholds=None, seed=0, verbose=True):
    """Train on ONE batch until every loss is near zero: MaskRCNN or Config, padded batch -> result.

    A model that cannot memorise a handful of objects cannot learn a data set; this finds frozen
    layers, gradients stopped on the way, targets that change between steps, broken losses.
    Trains a copy of the model (or a fresh model of the Config; your model is left untouched)
    with Adam at ``learning_rate``, through ``model.train_step`` and its NaN guard, for up to
    ``steps`` steps; it stops early once the median of each loss of the model's stage over the
    last ``OVERFIT_WINDOW`` steps is below its threshold (``OVERFIT_THRESHOLDS``).  The verdict
    names each loss that did not fall, with the layers it trains.  Use a small batch (1-2 images,
    a few objects) of the model's image size: a few hundred steps then take a minute on a CPU.
    """
    thresholds = {**OVERFIT_THRESHOLDS, **(thresholds or {})}
    model = _training_copy(model_or_config, seed)
    batch = _as_batch(batch, model.config)
    if not np.any(batch["num_instances"]):
        raise ValueError("check_overfit needs a batch with objects: without them there is nothing to memorise")
    names = STAGES[model.stage]["losses"]
    log, steps_run = _train_on_one_batch(model, batch, keras.optimizers.Adam(learning_rate), steps,
                                         stop_when=lambda h: _all_below(h, names, thresholds, OVERFIT_WINDOW))
    history = log.history
    problems, warnings, lines = [], [], []
    initial = {name: history[name][0] for name in names} if history["step"] else {}
    final = {name: _median_last(history, name, OVERFIT_WINDOW) for name in names}
    if model.nonfinite_step:
        problems.append(_nonfinite_text(model, None))
    failed = [name for name in names if not final[name] < thresholds[name]]
    frozen = _frozen_groups(model)
    for name in failed:
        owner = _LOSS_OWNER[name]
        hint = (f"the {owner} has no trainable weights (frozen)" if owner in frozen else
                f"check what trains the {owner}: frozen layers, a tf.stop_gradient, targets that change "
                "between steps, or a learning rate too low")
        if initial and initial[name] > thresholds[name] and final[name] > LR_MAX_GROWTH * initial[name]:
            hint = "it grew instead: the learning rate is too high for this model"
        problems.append(f"{name} did not fall near zero in {steps_run} steps: median of the last "
                        f"{OVERFIT_WINDOW} steps {final[name]:.4f} (first step {initial.get(name, float('nan')):.4f}, "
                        f"threshold {thresholds[name]}): {hint}")
    if frozen:
        warnings.append(f"frozen (no trainable weights): {', '.join(frozen)}")
    for name in names:
        lines.append(f"{name:9s} {initial.get(name, float('nan')):.4f} -> {final[name]:.4f} "
                     f"(threshold {thresholds[name]})")
    lines.append(f"{steps_run} steps of Adam at {learning_rate:g} on {len(batch['image'])} image(s) with "
                 f"{int(batch['num_instances'].sum())} objects")
    return _finish(OverfitResult, "check_overfit", problems, warnings, lines, verbose, steps_run=steps_run,
                   initial=initial, final=final, thresholds=thresholds, failed=failed, history=history)


def check_learning_rate(model_or_config, batch, learning_rate=None, *, steps=30, bad_batch_path=None, seed=0,
                        verbose=True):
    """A few steps at a peak learning rate on one batch: does the loss stay finite and fall? -> result.

    Uses the config's optimizer (``train.make_optimizer``: optimizer, weight decay, clipnorm) at a
    constant ``learning_rate`` (default: the peak that training uses, ``train.peak_learning_rate``)
    from the second step on (no warm-up, no decay), on a copy of the model.
    A non-finite loss or gradient is caught by the NaN guard of ``model.train_step``: the step is
    not applied, the run stops, and the verdict names the step and the loss term;
    ``bad_batch_path`` (e.g. ``"nan_batch.npz"``) receives the offending batch.  A total loss that
    grows by more than ``LR_MAX_GROWTH`` is a problem too.
    """
    model = _training_copy(model_or_config, seed)
    config = model.config
    peak = train_lib.peak_learning_rate(config)
    learning_rate = float(peak if learning_rate is None else learning_rate)
    batch = _as_batch(batch, config)
    # make_optimizer scales config.learning_rate with the batch (peak_learning_rate): undo the
    # factor so that the peak is learning_rate; a horizon of 10**9 steps keeps it constant.
    scaled = config.replace(learning_rate=learning_rate * config.learning_rate / peak, warmup_steps=0)
    optimizer = train_lib.make_optimizer(scaled, total_steps=10**9)
    log, steps_run = _train_on_one_batch(model, batch, optimizer, steps, bad_batch_path=bad_batch_path)
    history = log.history
    names = STAGES[model.stage]["losses"]
    weights_finite = all(bool(np.all(np.isfinite(w))) for w in model.get_weights())
    problems, warnings, lines = [], [], []
    terms = []
    if model.nonfinite_step:
        terms = _nonfinite_terms(model)
        problems.append(_nonfinite_text(model, bad_batch_path) + ". Lower the learning rate (or enable clipnorm)")
    totals = [sum(history[name][i] for name in names) for i in range(len(history["step"]))]
    if len(totals) > LR_WINDOW:
        recent = float(np.median(totals[-LR_WINDOW:]))
        lines.append(f"total loss {totals[0]:.3f} at the first step, {recent:.3f} over the last {LR_WINDOW}")
        if recent > LR_MAX_GROWTH * totals[0]:
            problems.append(f"the total loss grew from {totals[0]:.3f} to {recent:.3f} in {len(totals)} steps: "
                            "the learning rate is too high")
        elif recent >= totals[0]:
            warnings.append(f"the total loss did not fall in {len(totals)} steps: the learning rate may be too low")
    if not weights_finite:
        problems.append("some weights are not finite after the run: a non-finite update got through")
    lines.append(f"{config.optimizer} at {learning_rate:g} (clipnorm {config.clipnorm:g}), "
                 f"{int(model.optimizer.iterations.numpy())} steps applied")
    return _finish(LearningRateResult, "check_learning_rate", problems, warnings, lines, verbose,
                   learning_rate=learning_rate, steps_run=steps_run,
                   nonfinite_step=model.nonfinite_step, nonfinite_terms=terms, weights_finite=weights_finite,
                   bad_batch_path=bad_batch_path if model.nonfinite_step else None, history=history)


# ---------------------------------------------------------------------------
# Anchors, strides and receptive fields against the object sizes
# ---------------------------------------------------------------------------


def collect_boxes(source, config=None, n=None):
    """Boxes of the first ``n`` samples of ``source`` in the model's frame -> list of ``[N_i, 4]``.

    Samples whose image is not ``config.image_size`` square are letterboxed first
    (:func:`minimask.data.letterbox`), exactly as the model would see them.
    """
    n = len(source) if n is None else min(int(n), len(source))
    boxes = []
    for i in range(n):
        sample = source[i]
        size = np.shape(sample["image"])[:2]
        if config is not None and tuple(size) != (config.image_size, config.image_size):
            sample = data_lib.letterbox(sample, config.image_size)
        boxes.append(np.asarray(sample["boxes"], np.float32).reshape(-1, 4))
    return boxes


def _flat_boxes(boxes):
    if isinstance(boxes, (list, tuple)):
        boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes] or [np.zeros((0, 4))])
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"expected boxes [N, 4] (N > 0) or a list of [N_i, 4] arrays, got shape {boxes.shape}")
    return boxes


def _coverage_summary(boxes, config, scales):
    """anchor_coverage of ``scales`` plus the share of boxes below the negative threshold."""
    image_shape = (config.image_size, config.image_size)
    coverage = anchor_ops.anchor_coverage(boxes, image_shape, config.anchor_strides, scales, config.anchor_ratios,
                                          positive_threshold=config.rpn_positive_iou)
    weak = coverage["best_iou"] < config.rpn_negative_iou  # [N]
    for bucket in coverage["buckets"]:
        inside = (coverage["sizes"] >= bucket["min_size"]) & (coverage["sizes"] < bucket["max_size"])
        bucket["weak_share"] = float(weak[inside].mean()) if bucket["count"] else None
    coverage["weak_share"] = float(weak.mean())
    coverage["mean_best_iou"] = float(coverage["best_iou"].mean())
    return coverage


def _best_suggestion(boxes, config):
    """Try the SUGGESTION_GRID of anchors.suggest_scales -> (scales, coverage): the first within
    MAX_WEAK_SHARE with the fewest scales per level, then the fewest boxes below the positive IoU."""
    best = None
    for per_level, size_per_stride in SUGGESTION_GRID:
        scales = anchor_ops.suggest_scales(boxes, config.anchor_strides, scales_per_level=per_level,
                                           size_per_stride=size_per_stride)
        coverage = _coverage_summary(boxes, config, scales)
        # first good enough, then fewest anchors (a bigger RPN head), then the best fit
        key = (coverage["weak_share"] > MAX_WEAK_SHARE, per_level, coverage["uncovered_share"])
        if best is None or key < best[0]:
            best = (key, scales, coverage)
    return best[1], best[2]


def check_anchor_coverage(config, boxes, *, verbose=True):
    """Do the config's anchors fit the data's boxes? Config, boxes ``[N, 4]`` (or a list) -> result.

    For every box the best IoU any anchor reaches (:func:`minimask.anchors.anchor_coverage`).
    A box below ``config.rpn_negative_iou`` only gets a "low-quality" positive; more than
    ``MAX_WEAK_SHARE`` of such boxes is a problem, and the verdict then suggests anchor scales
    (:func:`minimask.anchors.suggest_scales`, the best of ``SUGGESTION_GRID`` by the same measure).
    Boxes must be in the model's frame (see :func:`collect_boxes`).
    """
    boxes = _flat_boxes(boxes)
    coverage = _coverage_summary(boxes, config, config.anchor_scales)
    problems, warnings, lines = [], [], []
    lines.append(f"{len(boxes)} boxes; best anchor IoU < {config.rpn_negative_iou} for {coverage['weak_share']:.1%}, "
                 f"< {config.rpn_positive_iou} for {coverage['uncovered_share']:.1%}; mean best IoU "
                 f"{coverage['mean_best_iou']:.2f}")
    for bucket in coverage["buckets"]:
        if bucket["count"]:
            lines.append(f"  size {bucket['name']:11s} {bucket['count']:6d} boxes: < {config.rpn_negative_iou} "
                         f"{bucket['weak_share']:.1%}, < {config.rpn_positive_iou} {bucket['uncovered_share']:.1%}, "
                         f"mean best IoU {bucket['mean_best_iou']:.2f}")
    suggested, suggested_coverage = None, None
    if coverage["weak_share"] > MAX_WEAK_SHARE:
        worst = max((b for b in coverage["buckets"] if b["count"]), key=lambda b: b["weak_share"])
        suggested, full = _best_suggestion(boxes, config)
        suggested_coverage = {key: full[key] for key in ("weak_share", "uncovered_share", "mean_best_iou")}
        problems.append(
            f"{coverage['weak_share']:.0%} of the boxes have no anchor at IoU >= {config.rpn_negative_iou} "
            f"(limit {MAX_WEAK_SHARE:.0%}), worst for sizes {worst['name']}; anchor sizes "
            f"{_scales_text(config.anchor_scales)} do not suit the data. Suggested: anchor_scales={suggested}: "
            f"{suggested_coverage['weak_share']:.1%} below "
            f"{config.rpn_negative_iou}, mean best IoU {suggested_coverage['mean_best_iou']:.2f}")
    elif coverage["uncovered_share"] > WARN_UNCOVERED_SHARE:
        warnings.append(f"{coverage['uncovered_share']:.0%} of the boxes rely on low-quality matches (no anchor at "
                        f"IoU >= {config.rpn_positive_iou}); normal for thin objects, see anchors.suggest_scales")
    return _finish(AnchorCoverageResult, "check_anchor_coverage", problems, warnings, lines, verbose,
                   uncovered_share=coverage["uncovered_share"], weak_share=coverage["weak_share"],
                   mean_best_iou=coverage["mean_best_iou"], buckets=coverage["buckets"],
                   suggested_scales=suggested, suggested_coverage=suggested_coverage)


def _scales_text(scales):
    return " ".join("/".join(f"{s:g}" for s in (level if isinstance(level, (list, tuple)) else (level,)))
                    for level in scales)


def pyramid_geometry(backbone_name):
    """Stride and receptive field of P2..P6 for a backbone preset -> list of 5 dicts.

    ``receptive_field``: image pixels one cell of ``Pk`` sees through its lateral path: ``Ck``
    (:func:`minimask.backbone.backbone_geometry`) plus FPN's 3x3 smoothing convolution; P6 is a
    stride-2 subsampling of P5 (same field).  ``rpn_window``: that plus the RPN's 3x3 convolution,
    what one RPN prediction sees.  Each 3x3 convolution adds ``2 x stride`` pixels.  The top-down
    path adds the (larger) fields of the coarser levels, so these are lower bounds.
    """
    geometry = backbone_lib.backbone_geometry(backbone_name)
    levels = []
    for k in (2, 3, 4, 5):
        field = geometry[f"C{k}"]
        smoothed = field.size + (RPN_CONV_KERNEL - 1) * field.jump
        levels.append({"level": f"P{k}", "stride": field.jump, "receptive_field": smoothed,
                       "rpn_window": smoothed + (RPN_CONV_KERNEL - 1) * field.jump})
    p5 = levels[-1]
    stride = 2 * p5["stride"]
    levels.append({"level": "P6", "stride": stride, "receptive_field": p5["receptive_field"],
                   "rpn_window": p5["receptive_field"] + (RPN_CONV_KERNEL - 1) * stride})
    return levels


def _best_anchor_level(boxes, config):
    """Pyramid level (0 = P2) of each box's best-IoU anchor under the config -> int ``[N]``."""
    image_shape = (config.image_size, config.image_size)
    anchors = anchor_ops.generate_anchors(image_shape, config.anchor_strides, config.anchor_scales,
                                          config.anchor_ratios)
    per_level = anchor_ops.anchors_per_level(image_shape, config.anchor_strides, config.anchor_scales,
                                             config.anchor_ratios)
    level_of_anchor = np.repeat(np.arange(len(per_level)), per_level)  # [A]
    chunk = max(1, 4_000_000 // len(anchors))  # an [A, chunk] IoU block of ~16 MB
    best = np.concatenate([iou(anchors, boxes[i:i + chunk]).numpy().argmax(axis=0)
                           for i in range(0, len(boxes), chunk)])  # [N]
    return level_of_anchor[best]


def check_receptive_field(config, boxes, *, verbose=True):
    """Strides and receptive fields of the pyramid levels against the object sizes -> result.

    For each level P2..P6: the stride of the network's feature map (from the backbone's geometry,
    :func:`pyramid_geometry`) and the config's anchor stride, which must be equal (else the
    anchors are laid on a grid that does not match the map: a problem); the receptive field of
    one RPN prediction; the boxes whose best anchor is on that level and their sizes.  Problems:
    a stride mismatch; more than ``MAX_SMALL_SHARE`` of the boxes smaller (sqrt area) than the
    finest anchor stride.  Warnings: anchors smaller than their stride (gaps), objects larger than
    the receptive field of their level.  Boxes in the model's frame (:func:`collect_boxes`).
    """
    boxes = _flat_boxes(boxes)
    sizes = np.sqrt(area(boxes).numpy())  # [N]
    network = pyramid_geometry(config.backbone)
    problems, warnings, lines = [], [], []
    if len(config.anchor_strides) != len(network):
        problems.append(f"{len(config.anchor_strides)} anchor strides for the {len(network)} levels P2..P6")
        return _finish(ReceptiveFieldResult, "check_receptive_field", problems, warnings, lines, verbose,
                       levels=[], small_share=float("nan"), size_percentiles={})
    best_level = _best_anchor_level(boxes, config)
    levels = []
    lines.append(f"{'level':5s} {'stride':>6s} {'anchor stride':>13s} {'anchor sizes':>12s} {'RPN window':>10s} "
                 f"{'boxes':>6s} {'their sizes':>12s}")
    for index, (geometry, stride, scales) in enumerate(zip(network, config.anchor_strides, config.anchor_scales)):
        mine = sizes[best_level == index]
        level = {**geometry, "anchor_stride": int(stride), "anchor_scales": tuple(scales), "num_boxes": len(mine),
                 "size_min": float(mine.min()) if len(mine) else None,
                 "size_max": float(mine.max()) if len(mine) else None}
        levels.append(level)
        name = geometry["level"]
        if min(scales) < stride:
            warnings.append(f"{name}: anchors of size {min(scales):g} are smaller than their stride {stride}: "
                            "gaps between neighbouring anchors")
        if len(mine) and level["size_max"] > geometry["rpn_window"]:
            warnings.append(f"{name}: boxes up to {level['size_max']:.0f} px have their best anchor here, but one "
                            f"RPN prediction of {name} sees {geometry['rpn_window']} px through its lateral path")
        their = f"{level['size_min']:.0f}-{level['size_max']:.0f} px" if len(mine) else "-"
        lines.append(f"{name:5s} {geometry['stride']:6d} {stride:13d} {_scales_text([scales]):>12s} "
                     f"{geometry['rpn_window']:10d} {len(mine):6d} {their:>12s}")
    network_strides = tuple(g["stride"] for g in network)
    if tuple(config.anchor_strides) != network_strides:
        wrong = [g["level"] for g, s in zip(network, config.anchor_strides) if s != g["stride"]]
        problems.append(f"anchor_strides {tuple(config.anchor_strides)} but the feature maps P2..P6 of "
                        f"{config.backbone} have strides {network_strides} (wrong on {', '.join(wrong)}): the anchors "
                        "of those levels sit on a grid that does not match the feature cells they are paired with")
    finest = min(config.anchor_strides)
    small = sizes < finest
    small_share = float(small.mean())
    if small_share > MAX_SMALL_SHARE:
        problems.append(f"{small_share:.0%} of the boxes are smaller (sqrt area) than the finest anchor stride "
                        f"{finest} (limit {MAX_SMALL_SHARE:.0%}): such a box can sit between anchor centres, where "
                        "its best anchor reaches IoU 0.14; use a finer stride or larger images")
    percentiles = {q: float(np.percentile(sizes, q)) for q in (0, 5, 50, 95, 100)}
    lines.append("box sizes sqrt(area): " + ", ".join(f"p{q} {v:.1f}" for q, v in percentiles.items())
                 + f"; {small_share:.1%} below the finest stride {finest}")
    return _finish(ReceptiveFieldResult, "check_receptive_field", problems, warnings, lines, verbose,
                   levels=levels, small_share=small_share, size_percentiles=percentiles)


# ---------------------------------------------------------------------------
# Box convention and data set
# ---------------------------------------------------------------------------

# Ways to read four numbers as a box: name -> function (boxes [N, 4]) -> (y1, x1, y2, x2) boxes.
_READINGS = {
    "(y1, x1, y2, x2)": lambda b: b,
    "(x1, y1, x2, y2), i.e. transposed": lambda b: b[:, [1, 0, 3, 2]],
    "COCO (x, y, w, h)": coco_xywh_to_yxyx,
    "(y, x, h, w)": lambda b: np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1),
}


def _pairwise_iou(a, b):
    """IoU of box ``a[i]`` with box ``b[i]``: ``[N, 4]``, ``[N, 4]`` -> ``[N]``."""
    if len(a) == 0:
        return np.zeros(0, np.float32)
    return iou(a[:, None, :], b[:, None, :]).numpy()[:, 0, 0]  # [N, 1, 4] x [N, 1, 4] -> [N, 1, 1]


def _image_shape(image_size, masks):
    if image_size is None:
        return None if masks is None else tuple(np.shape(masks)[1:3])
    if np.ndim(image_size) == 0:
        return (int(image_size), int(image_size))
    return tuple(int(s) for s in image_size[:2])


def _box_report(boxes, masks, image_shape, match_iou):
    """Index arrays of inverted / empty / outside / mismatched boxes, and the mask readings."""
    finite = np.all(np.isfinite(boxes), axis=1)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    report = {
        "inverted": np.flatnonzero(finite & ((heights < 0) | (widths < 0))),
        "empty": np.flatnonzero(~finite | (heights == 0) | (widths == 0)),
        "outside": np.zeros(0, np.int64), "mismatched": np.zeros(0, np.int64),
        "match_share": None, "readings": {}, "empty_masks": np.zeros(0, np.int64), "short_by_one": 0.0,
    }
    if image_shape is not None:
        h, w = image_shape
        tol = data_lib.BOUNDS_TOLERANCE
        out = ((boxes[:, [0, 2]] < -tol) | (boxes[:, [0, 2]] > h + tol)).any(1) | \
              ((boxes[:, [1, 3]] < -tol) | (boxes[:, [1, 3]] > w + tol)).any(1)
        report["outside"] = np.flatnonzero(finite & out)
    if masks is not None and len(boxes):
        masks = np.asarray(masks, bool)
        has = masks.reshape(len(masks), -1).any(axis=1)
        report["empty_masks"] = np.flatnonzero(~has)
        tight = boxes_from_masks(masks)
        usable = has & finite
        for name, read in _READINGS.items():
            read_boxes = read(boxes[usable]).astype(np.float32)
            report["readings"][name] = float(np.mean(_pairwise_iou(read_boxes, tight[usable]) >= match_iou)) \
                if usable.any() else 1.0
        matches = np.zeros(len(boxes), bool)
        matches[usable] = _pairwise_iou(boxes[usable], tight[usable]) >= match_iou
        report["mismatched"] = np.flatnonzero(usable & ~matches)
        report["match_share"] = float(matches[usable].mean()) if usable.any() else None
        # inclusive ends (y2 = last row instead of last row + 1) still pass the IoU test: look for them exactly
        report["short_by_one"] = float(np.mean(np.all(boxes[usable] == tight[usable] - [0, 0, 1, 1], axis=1))) \
            if usable.any() else 0.0
    return report


def _indices_text(indices, limit=8):
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def check_box_convention(boxes, masks=None, image_size=None, *, match_iou=MASK_MATCH_IOU, verbose=True):
    """Are these boxes ``(y1, x1, y2, x2)`` in pixels of their image? boxes ``[N, 4]``, masks ``[N, H, W]`` -> result.

    Problems: boxes with ``y2 < y1`` or ``x2 < x1`` (inverted), zero height or width or not
    finite (empty), outside the image (``image_size`` = ``S`` or ``(H, W)``, else the masks' size,
    with ``data.BOUNDS_TOLERANCE``), and, given the masks, boxes whose IoU with their mask's
    tight box (:func:`minimask.boxes.boxes_from_masks`) is below ``match_iou``.  The verdict
    then says which reading of the four numbers fits the masks: transposed ``(x1, y1, x2, y2)``,
    COCO ``(x, y, w, h)``...  Without masks, a transposed convention shows only on non-square
    images (boxes that leave the image but fit it transposed).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if masks is not None and len(masks) != len(boxes):
        raise ValueError(f"got {len(masks)} masks for {len(boxes)} boxes")
    image_shape = _image_shape(image_size, masks)
    report = _box_report(boxes, masks, image_shape, match_iou)
    problems, warnings, lines = [], [], []
    interpretation = "(y1, x1, y2, x2)"
    if len(report["inverted"]):
        problems.append(f"{len(report['inverted'])} boxes have y2 < y1 or x2 < x1 (boxes "
                        f"{_indices_text(report['inverted'])}): corners swapped, or (x, y, w, h) read as corners?")
    if len(report["empty"]):
        problems.append(f"{len(report['empty'])} boxes have zero height or width or are not finite "
                        f"(boxes {_indices_text(report['empty'])})")
    if len(report["outside"]):
        transposed = _READINGS["(x1, y1, x2, y2), i.e. transposed"](boxes[report["outside"]])
        fits = _box_report(transposed, None, image_shape, match_iou)["outside"]
        hint = (" they would fit transposed: (x, y) swapped?" if image_shape[0] != image_shape[1] and not len(fits)
                else " boxes of another image size (before a resize)?")
        problems.append(f"{len(report['outside'])} boxes leave the {image_shape[0]}x{image_shape[1]} image (boxes "
                        f"{_indices_text(report['outside'])});" + hint)
    if len(report["empty_masks"]):
        problems.append(f"{len(report['empty_masks'])} masks are empty (boxes {_indices_text(report['empty_masks'])})")
    if report["match_share"] is not None:
        readings = report["readings"]
        interpretation = max(readings, key=lambda name: (readings[name], name == "(y1, x1, y2, x2)"))
        lines.append("share of boxes matching their mask (IoU >= %g) when read as: " % match_iou
                     + ", ".join(f"{name} {share:.0%}" for name, share in readings.items()))
        if len(report["mismatched"]):
            hint = (f" They fit their masks read as {interpretation}: fix the conversion at the data's input"
                    if readings[interpretation] > readings["(y1, x1, y2, x2)"] else "")
            problems.append(f"{len(report['mismatched'])} of {len(boxes)} boxes do not match their mask's tight box "
                            f"(boxes {_indices_text(report['mismatched'])}).{hint}")
        if report["short_by_one"] > 0.5:
            warnings.append(f"{report['short_by_one']:.0%} of the boxes end one pixel short of their mask: inclusive "
                            "ends? minimask boxes are continuous: y2 = last row + 1 (see minimask.boxes)")
    else:
        lines.append("no masks given: only the order of the corners and the image bounds were checked")
    lines.append(f"{len(boxes)} boxes checked")
    return _finish(BoxConventionResult, "check_box_convention", problems, warnings, lines, verbose,
                   num_boxes=len(boxes), inverted=report["inverted"], empty=report["empty"],
                   outside=report["outside"], mismatched=report["mismatched"],
                   match_share=report["match_share"], interpretation=interpretation)


def _num_classes(source, config, num_classes):
    if num_classes is not None:
        return int(num_classes)
    if config is not None:
        return int(config.num_classes)
    if hasattr(source, "num_classes"):
        return int(source.num_classes)
    if hasattr(source, "category_names"):
        return len(source.category_names) - 1
    raise ValueError("check_dataset needs the number of classes: pass num_classes= or config=")


def check_dataset(source, n=None, *, config=None, num_classes=None, match_iou=MASK_MATCH_IOU, verbose=True):
    """Walk the first ``n`` samples of ``source`` (``len``, ``source[i]``) and count what goes wrong -> result.

    Problems: empty / inverted / non-finite boxes, boxes outside their image, empty masks, boxes
    that do not match their mask, class ids outside 1..K (K from ``num_classes``, ``config`` or
    the source), a data set without a single object.  Warnings: images without objects (legal:
    Mask R-CNN learns background from them, and minimask trains on them), classes never seen,
    more objects than ``config.max_instances`` (truncated in training), images of several sizes
    or of another size than the model's (they are letterboxed).  Also the class histogram.
    """
    count = len(source) if n is None else min(int(n), len(source))
    if count == 0:
        raise ValueError("check_dataset needs a source with at least one sample")
    k = _num_classes(source, config, num_classes)
    names = getattr(source, "category_names", None) or (config.class_names if config is not None else None)
    histogram = np.zeros(k + 1, np.int64)
    empty_images, degenerate, unknown, mismatched, outside, empty_masks, crowded = [], [], [], [], [], [], []
    sizes = {}
    total = 0
    for i in range(count):
        sample = source[i]
        boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        ids = np.asarray(sample["class_ids"], np.int64).reshape(-1)
        masks = sample.get("masks")
        shape = tuple(int(s) for s in np.shape(sample["image"])[:2])
        sizes[shape] = sizes.get(shape, 0) + 1
        total += len(boxes)
        if len(boxes) == 0:
            empty_images.append(i)
            continue
        if config is not None and len(boxes) > config.max_instances:
            crowded.append(i)
        report = _box_report(boxes, masks, shape, match_iou)
        degenerate += [(i, int(r)) for r in np.union1d(report["inverted"], report["empty"])]
        outside += [(i, int(r)) for r in report["outside"]]
        mismatched += [(i, int(r)) for r in report["mismatched"]]
        empty_masks += [(i, int(r)) for r in report["empty_masks"]]
        bad = (ids < 1) | (ids > k)
        unknown += [(i, int(r), int(ids[r])) for r in np.flatnonzero(bad)]
        histogram += np.bincount(ids[~bad], minlength=k + 1)[:k + 1]

    problems, warnings, lines = [], [], []
    for what, items in (("empty, inverted or non-finite boxes", degenerate), ("boxes outside their image", outside),
                        ("empty masks", empty_masks), ("boxes that do not match their mask (see check_box_convention)",
                                                       mismatched)):
        if items:
            problems.append(f"{len(items)} {what}: (image, row) {items[:5]}{' ...' if len(items) > 5 else ''}")
    if unknown:
        ids = sorted({u[2] for u in unknown})
        problems.append(f"{len(unknown)} objects with class ids {ids} outside 1..{k} (0 is the background): "
                        f"(image, row, id) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if total == 0:
        problems.append(f"none of the {count} images has an object")
    if empty_images:
        warnings.append(f"{len(empty_images)} of {count} images have no objects (images {empty_images[:8]}"
                        f"{' ...' if len(empty_images) > 8 else ''}): legal, they teach the background")
    unseen = [c for c in range(1, k + 1) if histogram[c] == 0]
    if unseen and total:
        warnings.append(f"classes never seen in these {count} images: {unseen}")
    if crowded:
        warnings.append(f"{len(crowded)} images have more than max_instances = {config.max_instances} objects; "
                        "training keeps the first max_instances")
    if len(sizes) > 1 or (config is not None and set(sizes) != {(config.image_size, config.image_size)}):
        warnings.append(f"image sizes {sorted(sizes)}: they are letterboxed to the model's input "
                        "(see draw_training_targets)")
    label = (lambda c: f"{c} ({names[c]})") if names is not None and len(names) > k else str
    lines.append(f"{count} images, {total} objects ({total / count:.2f} per image), "
                 f"{len(empty_images)} without objects")
    lines.append("class histogram: " + ", ".join(f"{label(c)}: {int(histogram[c])}" for c in range(1, k + 1)))
    return _finish(DatasetResult, "check_dataset", problems, warnings, lines, verbose, num_images=count,
                   num_objects=total, empty_images=empty_images, class_histogram=histogram, degenerate=degenerate,
                   unknown_classes=unknown, mismatched=mismatched, image_sizes=sizes)


def training_view(config, sample):
    """A sample exactly as the model receives it: letterboxed to ``config.image_size`` and padded -> dict.

    :func:`minimask.data.letterbox` (only if the image is not already the model's size), then
    :func:`minimask.data.pad_sample` with ``config.max_instances`` (truncating, as training does).
    Adds ``"dropped_by_resize"`` (objects whose mask vanished at this scale) and
    ``"dropped_by_padding"`` (objects past max_instances) and ``"content_shape"`` (the image
    part of the padded frame).
    """
    size = config.image_size
    height, width = np.shape(sample["image"])[:2]
    resized = sample
    if (height, width) != (size, size):
        resized = data_lib.letterbox(sample, size)
    scale = float(resized.get("scale", 1.0))
    padded = data_lib.pad_sample(resized, config.max_instances, config.max_ignore, truncate=True)
    padded["dropped_by_resize"] = len(sample["boxes"]) - len(resized["boxes"])
    padded["dropped_by_padding"] = len(resized["boxes"]) - int(padded["num_instances"])
    padded["content_shape"] = (round(height * scale), round(width * scale))
    padded["scale"] = scale
    return padded


def draw_training_targets(config, sample, ax=None):
    """Draw ``sample`` as the model sees it (after letterbox and padding) on ``ax`` -> ``ax``.

    The valid rows only (masks, boxes, class names), crowd boxes dashed white, the zero padding
    of the letterbox outlined in dashed grey, and a title with the scale and the objects lost to
    the resize or to ``max_instances``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    view = training_view(config, sample)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    n = int(view["num_instances"])
    visualize.draw_instances(ax, view["image"], view["boxes"][:n], view["class_ids"][:n], view["masks"][:n],
                             class_names=config.class_names)
    visualize.draw_boxes(ax, view["ignore_boxes"][:int(view["num_ignore"])], "white", linestyle="--")
    content_h, content_w = view["content_shape"]
    if (content_h, content_w) != (config.image_size, config.image_size):
        ax.add_patch(Rectangle((-0.5, -0.5), content_w, content_h, fill=False, edgecolor="0.6", linestyle="--"))
    lost = []
    if view["dropped_by_resize"]:
        lost.append(f"{view['dropped_by_resize']} vanished at this scale")
    if view["dropped_by_padding"]:
        lost.append(f"{view['dropped_by_padding']} over max_instances")
    ax.set_title(f"model input {config.image_size}x{config.image_size}, scale {view['scale']:.2f}: {n} objects"
                 + (f" ({', '.join(lost)})" if lost else ""), fontsize=9)
    return ax


# ---------------------------------------------------------------------------
# Memory of the data pipeline
# ---------------------------------------------------------------------------


def process_rss_mib():
    """Resident memory of this process in MiB (``VmRSS`` of ``/proc/self/status``).

    Where ``/proc`` does not exist, the *peak* RSS of ``resource.getrusage`` (kilobytes on
    Linux, bytes on macOS), which can only grow: good enough to see a leak, not a release.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # "VmRSS:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if os.uname().sysname == "Darwin" else peak / 1024.0


def _memory_curve(counts, num_samples, every, trace):
    """Walk a generator of cumulative sample counts to ``num_samples``, recording the RSS (and with
    ``trace`` the tracemalloc heap) every ``every`` samples; the generator is closed at the end."""
    curve = {"samples": [], "rss_mib": [], "traced_mib": [] if trace else None}

    def record(seen):
        curve["samples"].append(int(seen))
        curve["rss_mib"].append(process_rss_mib())
        if trace:
            curve["traced_mib"].append(tracemalloc.get_traced_memory()[0] / 2**20)

    if trace:
        tracemalloc.start()
    try:
        record(0)
        next_mark = every
        for seen in counts:
            if seen >= next_mark or seen >= num_samples:
                record(seen)
                next_mark += every
            if seen >= num_samples:
                break
    finally:
        counts.close()  # ends a tf.data iterator (and its prefetch threads) now, not at garbage collection
        if trace:
            tracemalloc.stop()
    return curve


def _slope(samples, values):
    """KiB per sample: least-squares slope of ``values`` (MiB) against ``samples`` (0 for < 2 points)."""
    if len(samples) < 2:
        return 0.0
    return float(np.polyfit(samples, values, 1)[0]) * 1024.0


def _sustained_slope(samples, values):
    """The smaller slope (KiB per sample) of the two halves of the run after the warm-up: a leak
    shows in both, a one-off step of the allocator in one only."""
    after = samples >= MEMORY_WARMUP_FRACTION * samples[-1]
    samples, values = samples[after], values[after]
    middle = len(samples) // 2
    halves = [(samples[:middle + 1], values[:middle + 1]), (samples[middle:], values[middle:])]
    return min(_slope(x, y) for x, y in halves)


def _indexed(source, num_samples):
    """Read ``source[i % len]`` one after the other -> cumulative sample counts."""
    for i in range(num_samples):
        sample = source[i % len(source)]
        del sample
        yield i + 1


def _through_tf_data(source, num_samples, batch_size, max_instances, max_ignore, shuffle):
    """Batches of :func:`minimask.data.make_dataset` (repeated) -> cumulative sample counts."""
    dataset = data_lib.make_dataset(source, batch_size, max_instances, shuffle=shuffle, seed=0, repeat=True,
                                    max_ignore=max_ignore, truncate=True)
    seen = 0
    for batch in dataset:
        seen += int(batch["image"].shape[0])
        del batch
        yield seen
        if seen >= num_samples:
            return


def measure_pipeline_memory(source, num_samples=3000, *, pipelines=("source", "tf.data"), batch_size=8,
                            max_instances=8, max_ignore=8, shuffle=None, every=100, verbose=True):
    """Memory of this process while ``num_samples`` samples flow through the data pipeline -> result.

    ``pipelines``: ``"source"`` reads ``source[i]`` in order (the generator alone, cycling over
    a finite source); ``"tf.data"`` iterates :func:`minimask.data.make_dataset` batches, repeated
    and, with ``shuffle=None``, shuffled as ``train.run`` does it: a finite data set is, an endless
    generator (``len >= 10**6``, whose shuffle buffer would hold every index) is not.  Each curve
    samples the RSS (:func:`process_rss_mib`), and for ``"source"`` the Python heap traced by
    ``tracemalloc``, every ``every`` samples.  After the first ``MEMORY_WARMUP_FRACTION`` of the
    run (buffers and caches fill up) both should be flat: a least-squares slope above
    ``MAX_GROWTH_KIB_PER_SAMPLE`` in both halves of the rest is a problem (a leak).
    """
    curves, growth, slopes, traced_slopes = {}, {}, {}, {}
    problems, lines = [], []
    for name in pipelines:
        if name not in ("source", "tf.data"):
            raise ValueError(f"unknown pipeline {name!r}: use 'source' or 'tf.data'")
    for name in pipelines:
        if name == "source":  # tracemalloc only here, if nobody else is tracing (see MEMORY_WARMUP_FRACTION)
            curves[name] = _memory_curve(_indexed(source, num_samples), num_samples, every,
                                         trace=not tracemalloc.is_tracing())
        else:
            mix = len(source) < 10**6 if shuffle is None else shuffle
            counts = _through_tf_data(source, num_samples, batch_size, max_instances, max_ignore, mix)
            curves[name] = _memory_curve(counts, num_samples, every, trace=False)
    for name, curve in curves.items():
        samples = np.asarray(curve["samples"], np.float64)
        rss = np.asarray(curve["rss_mib"])
        warm = int(np.argmax(samples >= MEMORY_WARMUP_FRACTION * samples[-1]))  # first point after the warm-up
        slopes[name] = _sustained_slope(samples, rss)
        growth[name] = float(rss[-1] - rss[warm])
        line = (f"{name:8s} {int(samples[-1])} samples: RSS {rss[0]:.0f} -> {rss[warm]:.0f} MiB after the "
                f"warm-up -> {rss[-1]:.0f} MiB at the end (growth {growth[name]:+.1f} MiB, sustained slope "
                f"{slopes[name]:+.2f} KiB/sample)")
        if curve["traced_mib"] is not None:
            traced_slopes[name] = _sustained_slope(samples, np.asarray(curve["traced_mib"]))
            line += f"; Python heap {traced_slopes[name]:+.2f} KiB/sample"
        lines.append(line)
        worst = max(slopes[name], traced_slopes.get(name, 0.0))
        if worst > MAX_GROWTH_KIB_PER_SAMPLE:
            problems.append(f"{name}: memory grows by {worst:.1f} KiB per sample after the warm-up (limit "
                            f"{MAX_GROWTH_KIB_PER_SAMPLE}): something keeps every sample (a cache, a list, a "
                            "growing buffer)")
    return _finish(MemoryResult, "measure_pipeline_memory", problems, [], lines, verbose, curves=curves,
                   growth_mib=growth, slope_kib_per_sample=slopes, traced_slope_kib_per_sample=traced_slopes)
