"""Training: data, optimizer, schedule, checkpoints and the run directory, around ``model.fit``.

Everything here is Keras/TensorFlow infrastructure (callbacks, TensorBoard, tf.data,
optimizers); the model's own training path is :meth:`minimask.model.MaskRCNN.compute_losses`.

A run directory holds::

    config.json            the Config of the run
    checkpoints/last.keras the latest checkpoint (model + optimizer), replaced atomically
    checkpoints/state.json step, schedule horizon, elapsed time of that checkpoint
    model.keras            the final model
    logs/                  TensorBoard logs (each loss term)
    history.json           every logged step's five losses (for the curves)
    loss_curves.png        the picture of those curves
    metrics.json           COCO AP on the validation data at the end
    nan_batch.npz          only if a loss went NaN/Inf: the batch that did it

Scaling (see also :mod:`minimask.model`): ``run``/``fit`` take a ``tf.distribute`` strategy
(default: the current one).  The model and its optimizer are created under ``strategy.scope()``,
Keras splits each global batch of ``config.batch_size`` images over the replicas, and only the
chief (``strategy.extended.should_checkpoint``) writes checkpoints and the run's files.  A run
interrupted anywhere continues with ``resume=True`` from its last atomic checkpoint, with the same
step count and data order: that is minimask's own mechanism, used instead of
``keras.callbacks.BackupAndRestore``, which records only the epoch (a run killed mid-epoch
would redo that epoch's batches with later steps of the schedule) and would write a second
copy of every checkpoint.

Two schedules: ``joint`` (all five losses at once, the Mask R-CNN paper's approximate
joint training) and ``alternating`` (Faster R-CNN's 4-step training, Ren et al. 2015
Sec. 3.2: RPN; detector on the fixed proposals of that RPN with its own backbone; RPN
fine-tuned on the detector's frozen backbone; heads fine-tuned), each step a quarter of
the budget.
"""
import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import tensorflow as tf
import keras

from minimask import boxes as box_ops
from minimask import data as data_lib
from minimask import evaluate as evaluate_lib
from minimask.config import Config
from minimask.model import LOSS_NAMES, MaskRCNN


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad run directory, non-finite loss, ...)."""


# ------------------------------------------------------------------------ learning rate
@keras.saving.register_keras_serializable(package="minimask")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``peak * warmup_factor`` to ``peak`` over ``warmup_steps``, then
    cosine decay to ``peak * final_factor`` at ``total_steps`` (or, with ``kind="steps"``,
    x0.1 at 2/3 and x0.01 at 8/9 of ``total_steps``: the Detectron "1x" shape).

    ``total_steps`` is a variable so that a time budget can fix it once the speed of a
    step has been measured (see :class:`TimeBudget`); it is saved with the schedule.
    """

    def __init__(self, peak, warmup_steps, total_steps, kind="cosine", warmup_factor=0.001, final_factor=0.01):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.warmup_factor = float(warmup_factor)
        self.final_factor = float(final_factor)
        self.total_steps = tf.Variable(float(total_steps), trainable=False, dtype=tf.float32, name="total_steps")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(max(self.warmup_steps, 1))
        ramp = self.warmup_factor + (1.0 - self.warmup_factor) * tf.minimum(step / warm, 1.0)
        total = tf.maximum(self.total_steps, warm + 1.0)
        progress = tf.clip_by_value((step - warm) / (total - warm), 0.0, 1.0)
        if self.kind == "cosine":
            decay = self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.kind == "steps":
            decay = tf.where(step < total * 2.0 / 3.0, 1.0, tf.where(step < total * 8.0 / 9.0, 0.1, 0.01))
        else:
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        return self.peak * ramp * decay

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": float(self.total_steps.numpy()), "kind": self.kind,
                "warmup_factor": self.warmup_factor, "final_factor": self.final_factor}


def peak_learning_rate(config, global_batch=None):
    """The peak learning rate for a global batch of ``global_batch`` images (default ``config.batch_size``).

    The linear scaling rule (Goyal et al. 2017, Sec. 2.1): ``config.learning_rate`` is the
    rate for ``config.lr_reference_batch`` images and scales with the batch, e.g. the COCO
    recipe's 0.02 for 16 images becomes 0.0025 for 2.  ``lr_reference_batch = 0`` means that
    ``learning_rate`` is meant for ``config.batch_size``.
    """
    batch = global_batch or config.batch_size
    reference = config.lr_reference_batch or config.batch_size
    return config.learning_rate * batch / reference


def make_optimizer(config, total_steps, global_batch=None):
    """The optimizer of ``config``, at :func:`peak_learning_rate`; with ``mixed_float16`` wrapped in
    a ``keras.optimizers.LossScaleOptimizer`` (dynamic loss scaling: float16 gradients underflow)."""
    peak = peak_learning_rate(config, global_batch)
    schedule = WarmupCosine(peak, config.warmup_steps, total_steps, kind=config.lr_schedule)
    clip = {"global_clipnorm": config.clipnorm} if config.clipnorm > 0 else {}
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=config.weight_decay, **clip)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, **clip)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (use 'sgd' or 'adamw')")
    if config.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _schedule_of(optimizer):
    """The learning-rate schedule object of an optimizer (inside a LossScaleOptimizer too)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    # Keras keeps the schedule object in ``_learning_rate`` (``learning_rate`` reads its current value)
    return getattr(optimizer, "_learning_rate", None)


# ------------------------------------------------------------------------ data
def synthetic_source(config, split, num_scenes, seed):
    """MNIST scenes of the config's size, generated on the fly (index = scene)."""
    from synthetic_data import MnistDetection

    return MnistDetection(split, num_scenes, seed, image_size=config.image_size)


def _has_size(source, size):
    """Whether every image of ``source`` is already ``size`` x ``size`` (checked from
    ``source.image_sizes`` when it has them, as a CocoDataset does, else on ``source[0]``)."""
    if hasattr(source, "image_sizes"):
        return bool(np.all(np.asarray(source.image_sizes).reshape(-1, 2) == size))
    return tuple(np.shape(source[0]["image"])[:2]) == (size, size)


def training_batches(source, config, start_step=0, seed=0, shuffle=False):
    """Padded training batches from ``source``, continuing after ``start_step`` batches.

    Images of another size (COCO) are letterboxed to ``config.image_size`` (:func:`minimask.data.letterbox`),
    and flipped at random when ``config.horizontal_flip``.  Under a multi-worker strategy each
    worker keeps its share of the batches (tf.data "DATA" sharding).
    """
    transform = None if _has_size(source, config.image_size) else functools.partial(
        data_lib.letterbox, size=config.image_size)
    dataset = data_lib.make_dataset(
        source, config.batch_size, config.max_instances, shuffle=shuffle, seed=seed, repeat=True,
        max_ignore=config.max_ignore, truncate=True, transform=transform, horizontal_flip=config.horizontal_flip)
    options = tf.data.Options()
    # the index dataset has no files to shard: shard the elements (each worker reads them all)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.skip(start_step).with_options(options)


# ------------------------------------------------------------------------ callbacks
def save_model(model, path):
    """``model.save(path)`` on the chief of its strategy -> True; on another worker -> False.

    Under a multi-worker strategy every worker must save, since reading some variables is a
    collective operation that all of them join; the others write to a temporary folder of their
    own, deleted at once (the usual tf.distribute rule), so only the chief's file is kept.
    """
    if model.distribute_strategy.extended.should_checkpoint:
        model.save(path)
        return True
    scratch = tempfile.mkdtemp(prefix="minimask_worker_")
    try:
        model.save(os.path.join(scratch, os.path.basename(path)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return False



def save_final_model(model, path, chief=True):
    """Save the trained weights without the optimizer's state (a third of the size) -> saved or not.

    The checkpoint keeps model + optimizer for ``--resume``; the final model is for inference,
    evaluation and export, which never need the optimizer's moments.  Only the chief writes it.
    """
    if not chief:
        return False
    final = MaskRCNN(model.config, load_backbone_weights=False).build_all()
    final.set_weights(model.get_weights())
    final.save(path)
    return True


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save model + optimizer every ``every_steps`` steps and at the end of training.

    The file is written next to its final name and moved over it with ``os.replace``,
    which is atomic: a kill at any moment leaves either the old or the new checkpoint,
    never half a file.  ``state.json`` (step, schedule horizon) is replaced the same way.
    """

    def __init__(self, run_dir, every_steps=200, extra_state=None):
        super().__init__()
        self.dir = os.path.join(run_dir, "checkpoints")
        self.every_steps = int(every_steps)
        self.extra_state = extra_state or {}
        os.makedirs(self.dir, exist_ok=True)

    def save(self):
        step = int(self.model.optimizer.iterations.numpy())
        path = os.path.join(self.dir, "last.keras")
        tmp = os.path.join(self.dir, "writing.keras")
        if not save_model(self.model, tmp):
            return  # a worker that is not the chief: nothing kept
        os.replace(tmp, path)
        state = {"step": step, **{k: (v() if callable(v) else v) for k, v in self.extra_state.items()}}
        _write_json_atomic(os.path.join(self.dir, "state.json"), state)

    def on_train_batch_end(self, batch, logs=None):
        if not self.model.stop_training and int(self.model.optimizer.iterations.numpy()) % self.every_steps == 0:
            self.save()

    def on_train_end(self, logs=None):
        if not getattr(self.model, "nonfinite_step", None):
            self.save()


class StopAtStep(keras.callbacks.Callback):
    """Stop when the optimizer has made ``last_step`` steps."""

    def __init__(self, last_step):
        super().__init__()
        self.last_step = int(last_step)

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.last_step:
            self.model.stop_training = True


class TimeBudget(keras.callbacks.Callback):
    """Stop after ``minutes``, with the learning-rate schedule fitted to the budget.

    After ``measure_after`` steps the speed is measured and the schedule's horizon is
    set to the number of steps that fit in the time left; training then stops at exactly
    that step.  The speed drifts during a run (one fit after 30 steps ended a 12-minute run
    9% early, one after 100 steps 6% late), so the horizon is fitted again at ``refits``
    (shares of the budget), each time from the speed since the last fit: the last fit
    leaves only a tenth of the budget to extrapolate, and moving the end of the cosine late
    in the run changes rates that are already small.
    """

    def __init__(self, minutes, schedule, measure_after=100, refits=(1 / 3, 2 / 3, 0.9), elapsed=0.0):
        super().__init__()
        self.seconds = float(minutes) * 60.0
        self.schedule = schedule
        self.measure_after = int(measure_after)
        self.refits = sorted(float(r) for r in refits)
        self.elapsed_before = float(elapsed)
        self.total_steps = None

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        resumed = self.elapsed_before > 0  # a resumed run keeps the horizon saved with it
        self.total_steps = int(self.schedule.total_steps.numpy()) if resumed else None
        self.fits_done = 1 + len(self.refits) if resumed else 0
        self.last_fit = None  # (time, step) the speed is measured from

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.start

    def _fit_horizon(self, step):
        now = time.perf_counter()
        rate = (step - self.last_fit[1]) / max(now - self.last_fit[0], 1e-9)  # steps / s since the last fit
        left = self.seconds - self.elapsed()
        self.total_steps = max(step + 1, int(step + left * rate))
        self.schedule.total_steps.assign(float(self.total_steps))
        self.last_fit = (now, step)
        self.fits_done += 1

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.last_fit is None:  # the first step includes tracing: measure from the next
            self.last_fit = (time.perf_counter(), step)
        elif self.fits_done == 0:
            if step - self.last_fit[1] >= self.measure_after:
                self._fit_horizon(step)
        elif (self.fits_done <= len(self.refits) and step - self.last_fit[1] >= 10
              and self.elapsed() >= self.refits[self.fits_done - 1] * self.seconds):
            self._fit_horizon(step)
        if self.total_steps is not None and step >= self.total_steps:
            self.model.stop_training = True
        if self.elapsed() > self.seconds * 1.1:  # a safety net if the machine slowed down
            self.model.stop_training = True


class StepLog(keras.callbacks.Callback):
    """Record each step's loss terms (for the loss curves) and stop on a non-finite loss.

    The NaN/Inf guard: the model never applies a non-finite step (see ``train_step``),
    saves that batch to ``nan_batch.npz``, and this callback stops training with the
    step and the loss terms named.  The last checkpoint on disk is the last good one.
    """

    def __init__(self, every=1):
        super().__init__()
        self.every = int(every)
        self.history = {name: [] for name in ("step",) + LOSS_NAMES}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if not bool(self.model.last_finite.numpy()):
            values = {n: float(v.numpy()) for n, v in self.model.last_losses.items()}
            bad = [n for n, v in values.items() if not np.isfinite(v)] or ["(a gradient)"]
            self.model.nonfinite_step = step + 1  # the skipped step did not count
            self.model.stop_training = True
            self.message = (f"non-finite loss at step {step + 1}: {', '.join(bad)} "
                            f"(values {values}); the batch is saved as nan_batch.npz and the last "
                            f"checkpoint is the last good one")
            print("\n" + self.message)
            return
        if step % self.every == 0:
            self.history["step"].append(step)
            for name in LOSS_NAMES:
                self.history[name].append(float(self.model.last_losses[name].numpy()))


# ------------------------------------------------------------------------ the run
def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def make_strategy():
    """The ``tf.distribute`` strategy for this machine (what ``python -m minimask train`` uses).

    ``MultiWorkerMirroredStrategy`` when the ``TF_CONFIG`` environment variable describes a
    cluster (one process per machine, each with its own ``TF_CONFIG`` task index), else
    ``MirroredStrategy`` over the GPUs when more than one is visible, else the default
    strategy (one device).
    """
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def set_determinism(seed):
    """Seeds for Python, numpy and TensorFlow; deterministic TF ops (same curve on CPU)."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def load_run(run_dir):
    """(config, model) of a run directory: the final model if there is one, else the last checkpoint."""
    if not os.path.isdir(run_dir):
        raise TrainingError(f"run directory {run_dir!r} does not exist")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise TrainingError(f"{run_dir!r} is not a minimask run directory (no config.json)")
    config = Config.load(config_path)
    for path in (os.path.join(run_dir, "model.keras"), os.path.join(run_dir, "checkpoints", "last.keras")):
        if os.path.exists(path):
            return config, keras.models.load_model(path, compile=False)
    raise TrainingError(f"{run_dir!r} has neither model.keras nor checkpoints/last.keras")


def fit(model, batches, config, run_dir, *, steps=None, minutes=None, stage="joint", proposal_model=None,
        resume_state=None, verbose=1, strategy=None):
    """Train ``model`` on ``batches`` until ``steps`` optimizer steps in all, or for ``minutes``.

    Returns the :class:`StepLog` history.  A resumed model (``resume_state``) keeps its
    optimizer, so its step count, schedule and moments continue where they stopped.
    ``strategy``: the ``tf.distribute`` strategy the model was created under (default: that one);
    the optimizer is made in its scope and each batch of ``batches`` (a global batch) is split
    over its replicas by Keras.
    """
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    strategy = strategy or model.distribute_strategy
    if strategy is not model.distribute_strategy:
        raise TrainingError("the model must be created under the strategy's scope: `with strategy.scope(): "
                            "model = MaskRCNN(config).build_all()`")
    if minutes is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # each machine would measure its own speed and could stop at another step than the others
        raise TrainingError("a time budget cannot be shared by several machines: give steps or epochs")
    model.set_stage(stage, proposal_model=proposal_model)
    start_step = int(model.optimizer.iterations.numpy()) if resume_state else 0
    horizon = steps if steps is not None else (resume_state or {}).get("total_steps") or 10**6
    with strategy.scope():
        # a fresh optimizer for every stage; a resumed run keeps the one saved in its checkpoint
        optimizer = model.optimizer if resume_state else make_optimizer(config, horizon)
        model.compile(optimizer=optimizer, jit_compile=False)
        if not model.optimizer.built:
            # its slots (momentum, ...) are made here, in the scope: made inside the first
            # distributed step they would not be mirrored, and the step fails
            model.optimizer.build(model.trainable_variables)
    schedule = _schedule_of(model.optimizer)
    if minutes is not None and not isinstance(schedule, WarmupCosine):
        raise TrainingError("a time budget needs the WarmupCosine schedule of train.make_optimizer")
    model.nonfinite_step = None
    log = StepLog()
    state = {"stage": stage}
    callbacks = [log]
    if strategy.extended.should_checkpoint:  # the chief writes the logs
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "logs", stage), update_freq=50))
    budget = None
    if minutes is not None:
        budget = TimeBudget(minutes, schedule, elapsed=(resume_state or {}).get("elapsed", 0.0))
        callbacks.append(budget)
        state["total_steps"] = lambda: budget.total_steps
        state["elapsed"] = lambda: budget.elapsed()
    callbacks.append(AtomicCheckpoint(run_dir, every_steps=config.checkpoint_every, extra_state=state))
    steps_per_epoch = config.steps_per_epoch
    if steps is not None:  # the run's total: a resumed run stops at the same step as an unbroken one
        callbacks.insert(0, StopAtStep(steps))
        epochs = max(1, math.ceil(steps / steps_per_epoch))
        if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            epochs += 1  # room for the steps it skips while finding its loss scale; StopAtStep ends the run
    else:
        epochs = 10**6  # TimeBudget stops the run
    with strategy.scope():
        model.fit(batches, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
                  initial_epoch=start_step // steps_per_epoch, callbacks=callbacks, verbose=verbose)
    if model.nonfinite_step:
        raise TrainingError(log.message)
    return log.history


def plot_loss_curves(history, path=None, ax=None, smooth=10):
    """The five loss terms against the step (a moving average of ``smooth`` points)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.asarray(history["step"])
    for name in LOSS_NAMES:
        values = np.asarray(history[name], np.float64)
        if len(values) == 0 or not np.any(values):
            continue
        k = max(1, min(smooth, len(values)))
        averaged = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], averaged, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training losses")
    if own and path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ax


def _new_model(config):
    """A built MaskRCNN of ``config``; a failed ImageNet download becomes a TrainingError saying what to do."""
    try:
        model = MaskRCNN(config)
    except RuntimeError as err:
        if config.backbone_weights != "imagenet":
            raise
        raise TrainingError(
            f"{err}. On a machine with internet, `python -m minimask fetch-weights --backbone {config.backbone} "
            f"--out {config.backbone}_imagenet.weights.h5` saves them; then train with --backbone-weights "
            "and that file") from err
    return model.build_all()


def evaluate_source(model, source, coco_gt=None, verbose=True):
    """COCO evaluation of ``model`` on any source -> (metrics of ``evaluate.evaluate_coco``, results list).

    Images of the model's size go through :func:`minimask.evaluate.evaluate_model`.  Others (COCO)
    are letterboxed one at a time (:func:`minimask.predict.predict_image`) and their detections
    mapped back to the image's own pixels, so that they are scored against its own annotations
    (``coco_gt``, e.g. ``COCO(val_json)``, else built from the samples).
    """
    if _has_size(source, model.config.image_size):
        return evaluate_lib.evaluate_model(model, source, coco_gt=coco_gt, verbose=verbose)
    from minimask import predict as predict_lib

    image_ids, detections = [], []
    for i in range(len(source)):
        sample = source[i]
        found = predict_lib.predict_image(model, sample["image"], score_threshold=0.0)
        # a detection may lie in the letterbox padding: clip it to the image, drop it if nothing is left
        height, width = np.shape(sample["image"])[:2]
        boxes = box_ops.clip(found["boxes"], height, width).numpy().reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        detections.append(dict({k: np.asarray(v)[keep] for k, v in found.items()}, boxes=boxes[keep]))
        image_ids.append(int(sample["image_id"]))
    category_ids = getattr(source, "coco_category_ids", None)
    if coco_gt is None:
        samples = [source[i] for i in range(len(source))]
        coco_gt = evaluate_lib.coco_from_dict(evaluate_lib.coco_dict_from_samples(samples, source.category_names))
        category_ids = None
    results = evaluate_lib.detections_to_coco_results(image_ids, detections, category_ids)
    return evaluate_lib.evaluate_coco(coco_gt, results, verbose=verbose), results


def run(config, run_dir, *, train_source=None, val_source=None, val_coco=None, steps=None, minutes=None,
        schedule="joint", resume=False, verbose=1, evaluate=True, strategy=None):
    """The whole recipe of ``python -m minimask train``: returns (model, metrics summary or None).

    ``train_source`` / ``val_source``: sample sources (default: synthetic MNIST scenes of the
    train and val digit pools); images of another size than ``config.image_size`` are letterboxed.
    ``steps`` or ``minutes``; without either, ``config.train_images / config.batch_size`` steps if
    the config gives ``train_images``, else ``config.train_minutes``.
    ``resume`` continues from ``run_dir/checkpoints`` with the same step count.
    ``strategy``: a ``tf.distribute`` strategy (default: the current one); model and optimizer
    are created in its scope, and only its chief writes files.
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = strategy.extended.should_checkpoint
    if steps is None and minutes is None:
        if config.train_images:
            steps = max(1, math.ceil(config.train_images / config.batch_size))
        else:
            minutes = config.train_minutes
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.json")
    ckpt = os.path.join(run_dir, "checkpoints", "last.keras")
    resume_state = None
    if resume:
        if not os.path.exists(ckpt):
            raise TrainingError(f"cannot resume: {ckpt} does not exist")
        saved = Config.load(config_path)
        if saved != config:
            changed = sorted(k for k in saved.__dataclass_fields__ if getattr(saved, k) != getattr(config, k))
            raise TrainingError(f"cannot resume {run_dir!r} with a different config (fields {changed})")
        with open(os.path.join(run_dir, "checkpoints", "state.json")) as f:
            resume_state = json.load(f)
    elif os.path.exists(ckpt):
        raise TrainingError(f"{run_dir!r} already holds a run: pass --resume to continue it, or choose --out")
    if config.freeze_batchnorm and not config.backbone_weights:
        warnings.warn("frozen BatchNorm with a randomly initialized backbone: its statistics are not "
                      "learned; give backbone weights, or set freeze_batchnorm=False", stacklevel=2)
    if chief:
        config.save(config_path)
    set_determinism(config.seed)
    if train_source is None:
        train_source = synthetic_source(config, "train", 10**7, config.seed)
    with strategy.scope():  # the variables of model and optimizer are the strategy's (mirrored, ...)
        model = keras.models.load_model(ckpt) if resume_state is not None else _new_model(config)
    model.bad_batch_path = os.path.join(run_dir, "nan_batch.npz") if chief else None
    start = int(model.optimizer.iterations.numpy()) if resume_state else 0
    # a finite dataset is reshuffled every epoch; endless synthetic scenes are new at every index
    batches = training_batches(train_source, config, start_step=start, seed=config.seed,
                               shuffle=len(train_source) < 10**6)
    if schedule == "joint":
        history = fit(model, batches, config, run_dir, steps=steps, minutes=minutes,
                      resume_state=resume_state, verbose=verbose, strategy=strategy)
    elif schedule == "alternating":
        history = alternating(model, batches, config, run_dir, steps=steps, minutes=minutes, verbose=verbose,
                              strategy=strategy)
    else:
        raise ValueError(f"unknown schedule {schedule!r} (use 'joint' or 'alternating')")
    if save_final_model(model, os.path.join(run_dir, "model.keras"), chief):
        _write_json_atomic(os.path.join(run_dir, "history.json"), history)
        plot_loss_curves(history, os.path.join(run_dir, "loss_curves.png"))
    if not evaluate or not chief:
        return model, None
    if val_source is None:
        val_source = synthetic_source(config, "val", 200, config.seed + 1)
    metrics, results = evaluate_source(model, val_source, coco_gt=val_coco, verbose=verbose > 0)
    summary = evaluate_lib.summary(metrics)
    _write_json_atomic(os.path.join(run_dir, "metrics.json"), summary)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return model, summary


def alternating(model, batches, config, run_dir, *, steps=None, minutes=None, verbose=1, strategy=None):
    """Faster R-CNN's 4-step alternating training (Ren et al. 2015, Sec. 3.2), a quarter budget each.

    1. train backbone + RPN;  2. train a detector (its own backbone, fresh) on the proposals
    of the fixed step-1 network;  3. fine-tune the RPN head on the detector's frozen backbone;
    4. fine-tune the box and mask heads, backbone and RPN fixed.  Returns the joined history.
    """
    part = dict(steps=steps // 4) if steps is not None else dict(minutes=minutes / 4.0)
    history = {name: [] for name in ("step",) + LOSS_NAMES}

    def add(h, offset):
        for k in history:
            history[k].extend([v + offset for v in h[k]] if k == "step" else h[k])

    strategy = strategy or model.distribute_strategy
    part = dict(part, verbose=verbose, strategy=strategy)
    rpn_model = model  # step 1 trains the RPN in the model that will also be the proposal source
    add(fit(rpn_model, batches, config, run_dir, stage="rpn", **part), 0)
    offset = int(rpn_model.optimizer.iterations.numpy())
    with strategy.scope():
        detector = _new_model(config)
    detector.bad_batch_path = model.bad_batch_path
    add(fit(detector, batches, config, run_dir, stage="detector", proposal_model=rpn_model, **part), offset)
    offset += int(detector.optimizer.iterations.numpy())
    detector.rpn_head.set_weights(rpn_model.rpn_head.get_weights())
    for stage in ("rpn_finetune", "heads_finetune"):
        add(fit(detector, batches, config, run_dir, stage=stage, **part), offset)
        offset += int(detector.optimizer.iterations.numpy())
    # the trained detector's weights become the returned model's
    model.set_stage("joint")
    model.set_weights(detector.get_weights())
    return history
