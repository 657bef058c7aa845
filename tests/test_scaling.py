"""Scaling to COCO, verified on a CPU: the COCO recipe on COCO-format files, the horizontal flip,
mixed precision, and tf.distribute's loss reduction against a single device.

The model sizes are cut for time (each test says how); what is tested is the plumbing that a
GPU run of the real recipe goes through: the same code paths, the same reductions.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras
from PIL import Image

from conftest import synthetic_batch, tiny_config
from minimask import data, train
from minimask.cli import main as cli_main
from minimask.config import Config, get_config
from minimask.model import LOSS_NAMES, MaskRCNN
from synthetic_data.export import export_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the COCO preset
def test_coco_preset_is_the_papers_recipe():
    c = get_config("coco_r50_fpn")
    assert (c.backbone, c.backbone_weights, c.pixel_normalization) == ("resnet50", "imagenet", "caffe")
    assert (c.freeze_stages, c.freeze_batchnorm, c.fpn_width) == (2, True, 256)
    assert c.anchor_scales == ((32,), (64,), (128,), (256,), (512,)) and c.anchor_strides == (4, 8, 16, 32, 64)
    assert c.anchor_ratios == (0.5, 1.0, 2.0)
    assert (c.rpn_post_nms_train, c.rpn_post_nms_test, c.rois_per_image, c.roi_positive_fraction) == (
        2000, 1000, 512, 0.25)
    assert (c.box_pool_size, c.mask_pool_size, c.mask_size, c.max_detections) == (7, 14, 28, 100)
    assert (c.optimizer, c.lr_schedule, c.clipnorm, c.horizontal_flip) == ("sgd", "steps", 0.0, True)
    assert c.num_classes == 80 and len(c.class_names) == 81 and c.class_names[0] == "background"
    assert c.train_images // c.batch_size == 90_000  # the 1x schedule
    for name in ("coco_r101_fpn", "coco_x101_fpn"):
        assert Config.from_dict(get_config(name).to_dict()) == get_config(name)
    assert get_config("coco_r101_fpn").backbone == "resnet101"


def test_learning_rate_scales_linearly_with_the_global_batch():
    coco = get_config("coco_r50_fpn")
    assert train.peak_learning_rate(coco) == pytest.approx(0.02)
    assert train.peak_learning_rate(coco.replace(batch_size=2)) == pytest.approx(0.0025)
    assert train.peak_learning_rate(coco, global_batch=64) == pytest.approx(0.08)
    assert train.peak_learning_rate(get_config("coco_x101_fpn")) == pytest.approx(0.01)  # the paper's ResNeXt LR
    mnist = get_config("mnist")  # lr_reference_batch = 0: learning_rate is for the config's own batch
    assert train.peak_learning_rate(mnist.replace(batch_size=32)) == mnist.learning_rate
    first_rate = train.make_optimizer(coco.replace(batch_size=2), 90_000).learning_rate
    assert float(first_rate) == pytest.approx(0.0025 * 0.001)  # the warm-up starts at 1/1000 (D2 WARMUP_FACTOR)


def test_imagenet_weights_need_caffe_pixels():
    with pytest.raises(ValueError, match="caffe"):
        MaskRCNN(tiny_config(backbone="resnet50", backbone_weights="imagenet"))


# ----------------------------------------------------------------------------- the flip
def _numpy_flip(sample):
    """The reference: reverse the columns; a box [x1, x2) becomes [W - x2, W - x1)."""
    width = sample["image"].shape[1]
    out = dict(sample)
    out["image"] = sample["image"][:, ::-1]
    out["masks"] = sample["masks"][:, :, ::-1]
    for key in ("boxes", "ignore_boxes"):
        y1, x1, y2, x2 = np.moveaxis(sample[key], -1, 0)
        out[key] = np.stack([y1, width - x2, y2, width - x1], axis=-1)
    return out


def _random_padded_sample(rng, height=12, width=20, rows=3):
    masks = rng.random((rows, height, width)) < 0.2
    masks[-1] = False  # a padding row
    boxes = data.boxes_from_masks(masks)
    return {"image": rng.integers(0, 255, (height, width, 3)).astype(np.uint8), "boxes": boxes,
            "class_ids": np.array([1, 2, 0], np.int32), "masks": masks, "num_instances": np.int32(2),
            "ignore_boxes": np.array([[1.0, 2.0, 5.0, 9.0]], np.float32), "num_ignore": np.int32(1)}


def test_flip_matches_a_numpy_reference_and_undoes_itself():
    rng = np.random.default_rng(0)
    for _ in range(3):
        sample = _random_padded_sample(rng)
        flipped = {k: np.asarray(v) for k, v in data.flip_left_right(sample).items()}
        expected = _numpy_flip(sample)
        for key in sample:
            np.testing.assert_array_equal(flipped[key], expected[key], err_msg=key)
        # the boxes of the flipped masks are the flipped boxes (the flip keeps box and mask together)
        np.testing.assert_array_equal(data.boxes_from_masks(flipped["masks"][:2]), flipped["boxes"][:2])
        twice = data.flip_left_right(data.flip_left_right(sample))
        for key in sample:
            np.testing.assert_array_equal(np.asarray(twice[key]), sample[key], err_msg=key)


class _Samples:
    """A source of fixed random samples (``len`` and ``[i]``), for make_dataset."""

    def __init__(self, n):
        rng = np.random.default_rng(1)
        self.samples = [_random_padded_sample(rng) for _ in range(n)]
        for i, s in enumerate(self.samples):
            s["image_id"] = i

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_pipeline_flips_about_half_the_samples_deterministically():
    source = _Samples(8)

    def epochs(seed):
        dataset = data.make_dataset(source, 1, 3, max_ignore=1, shuffle=False, seed=seed, horizontal_flip=True)
        return [{k: v[0].numpy() for k, v in batch.items()} for batch in dataset.take(64)]

    first, again = epochs(3), epochs(3)
    flips = []
    for position, (batch, same) in enumerate(zip(first, again)):
        original = source[position % 8]
        flipped = _numpy_flip(original)
        is_flipped = np.array_equal(batch["image"], flipped["image"])
        assert is_flipped or np.array_equal(batch["image"], original["image"])
        reference = flipped if is_flipped else original
        for key in ("masks", "boxes", "ignore_boxes"):  # flipped together with the image
            np.testing.assert_array_equal(batch[key], reference[key], err_msg=key)
        np.testing.assert_array_equal(batch["image"], same["image"])  # same seed, same flips
        flips.append(is_flipped)
    assert 16 <= sum(flips) <= 48  # a fair coin (64 draws: outside these bounds with p < 1e-4)
    assert flips[:8] != flips[8:16]  # a new coin every epoch
    other = epochs(4)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


# ----------------------------------------------------------------------------- COCO-format data
@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    """Synthetic scenes exported as COCO, then edited to hold every kind of annotation:
    compressed RLE (the export's), uncompressed RLE, a polygon, a crowd region, and an extra
    96x64 image with no annotation (so the images also differ in size and get letterboxed)."""
    root = tmp_path_factory.mktemp("coco")
    paths = export_coco(str(root), counts={"train": 4}, seed=0, image_size=96, min_digits=2, max_digits=3,
                        digit_size=(20, 36), empty_fraction=0.0)
    coco = json.loads(paths["train"].read_text())
    annotations = coco["annotations"]
    x, y, w, h = annotations[0]["bbox"]
    annotations[0]["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon
    rle = annotations[1]["segmentation"]
    annotations[1]["segmentation"] = {"size": rle["size"], "counts": data.rle_string_to_counts(rle["counts"])}
    crowd = np.zeros((96, 96), bool)
    crowd[60:90, 5:40] = True
    annotations.append({"id": 10_000, "image_id": coco["images"][1]["id"], "category_id": 3, "iscrowd": 1,
                        "area": int(crowd.sum()), "bbox": [5.0, 60.0, 35.0, 30.0],
                        "segmentation": data.encode_mask(crowd)})
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(root / "train" / "empty.png")
    coco["images"].append({"id": 9_999, "file_name": "empty.png", "height": 64, "width": 96})
    paths["train"].write_text(json.dumps(coco))
    return str(paths["train"]), str(root / "train")


def test_the_edited_coco_file_reads_as_intended(coco_files):
    source = data.CocoDataset(*coco_files)
    counts = [len(source[i]["boxes"]) for i in range(len(source))]
    assert counts[-1] == 0 and all(n >= 2 for n in counts[:-1])
    assert len(source[1]["ignore_boxes"]) == 1
    polygon = [a for a in json.load(open(coco_files[0]))["annotations"] if isinstance(a["segmentation"], list)]
    assert len(polygon) == 1


def _coco_cpu_config(source, **changes):
    """The COCO recipe at 128 px with a small backbone and narrow heads, for time: ResNet-50 with
    the full heads took over a minute for two steps on the shared 2-core machine (the real preset
    is checked by test_resnet50_preset_losses_are_finite_at_128_pixels and by hand with the CLI).
    Everything else is the preset's: anchors, proposal and RoI counts, schedule, flip, frozen
    stem/stage 2 and BatchNorm.  The classes come from the file, as the command line does."""
    return get_config(
        "coco_r50_fpn", image_size=128, batch_size=2, backbone="mini_resnet", backbone_weights="",
        pixel_normalization="standard", fpn_width=64, box_head_width=256, mask_head_width=64,
        num_classes=source.num_classes, class_names=tuple(source.category_names), checkpoint_every=1000,
        **changes)


def test_coco_recipe_trains_checkpoints_and_resumes_on_coco_files(coco_files, tmp_path):
    from pycocotools.coco import COCO

    source = data.CocoDataset(*coco_files)
    config = _coco_cpu_config(source)
    run_dir = str(tmp_path / "coco_run")
    with pytest.warns(UserWarning, match="frozen BatchNorm"):  # random backbone weights
        model, _ = train.run(config, run_dir, train_source=source, steps=2, verbose=0, evaluate=False)
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert history["step"] == [1, 2]
    assert all(np.isfinite(history[name]).all() for name in LOSS_NAMES)
    keras.utils.set_random_seed(config.seed)  # the run's initial weights, rebuilt
    initial = MaskRCNN(config).build_all()
    assert [w.path for w in initial.weights] == [w.path for w in model.weights]
    changed = {id(w): not np.array_equal(w.numpy(), v.numpy()) for w, v in zip(initial.weights, model.weights)}
    assert any(changed[id(w)] for w in initial.box_head.weights)
    assert any(changed[id(w)] for w in initial.rpn_head.weights)
    frozen = [w for w in initial.backbone_fpn.weights if w.path.startswith(("stem_", "stage2_"))]
    assert frozen and not any(changed[id(w)] for w in frozen)  # stem and stage 2 frozen (FREEZE_AT = 2)
    later = [w for w in initial.backbone_fpn.weights if w.path.startswith("stage3_") and "conv" in w.path]
    assert later and any(changed[id(w)] for w in later)
    bn_stats = [w for w in initial.backbone_fpn.weights if "moving" in w.path]
    assert bn_stats and not any(changed[id(w)] for w in bn_stats)  # frozen BatchNorm

    state = json.load(open(os.path.join(run_dir, "checkpoints", "state.json")))
    assert state["step"] == 2
    restored = keras.models.load_model(os.path.join(run_dir, "checkpoints", "last.keras"))
    assert int(restored.optimizer.iterations.numpy()) == 2
    for a, b in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    # resume to step 4, then evaluate on the original-size images (letterboxed, mapped back)
    with pytest.warns(UserWarning, match="frozen BatchNorm"):
        model, summary = train.run(config, run_dir, train_source=source, steps=4, resume=True, verbose=0,
                                   val_source=source, val_coco=COCO(coco_files[0]))
    assert int(model.optimizer.iterations.numpy()) == 4
    assert json.load(open(os.path.join(run_dir, "checkpoints", "state.json")))["step"] == 4
    assert json.load(open(os.path.join(run_dir, "history.json")))["step"] == [3, 4]
    assert set(summary) == {"bbox", "segm"}
    results = json.load(open(os.path.join(run_dir, "results.json")))
    sizes = {info["id"]: (info["height"], info["width"]) for info in json.load(open(coco_files[0]))["images"]}
    for entry in results:  # in each image's own pixels
        x, y, w, h = entry["bbox"]
        height, width = sizes[entry["image_id"]]
        assert x + w <= width + 0.5 and y + h <= height + 0.5
        assert entry["segmentation"]["size"] == [height, width]


def test_resnet50_preset_losses_are_finite_at_128_pixels():
    """The real preset (ResNet-50, FPN 256, 1024-wide box head, 4-conv mask head), random weights."""
    config = get_config("coco_r50_fpn", image_size=128, backbone_weights="", num_classes=10,
                        class_names=("background",) + tuple(str(d) for d in range(10)), max_instances=4)
    model = MaskRCNN(config)  # its layers are built by their first call, inside the tape
    batch = {k: tf.constant(v) for k, v in synthetic_batch(config, (3, 0)).items()}
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, training=True)
        total = tf.add_n(list(losses.values()))
    grads = tape.gradient(total, model.trainable_variables)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert all(g is None or np.isfinite(g.numpy()).all() for g in grads)
    assert len(model.trainable_variables) < len(model.weights)  # frozen stem, stage 2 and BN


def test_cli_runs_the_recipe_with_the_files_classes_and_size(coco_files, tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_run(config, run_dir, **kwargs):
        calls.update(config=config, run_dir=run_dir, **kwargs)
        return None, {"bbox": {}, "segm": {}}

    monkeypatch.setattr(train, "run", fake_run)
    out = str(tmp_path / "run")
    argv = ["train", "--config", "coco_r50_fpn", "--train-json", coco_files[0], "--train-images", coco_files[1],
            "--val-json", coco_files[0], "--val-images", coco_files[1], "--image-size", "256",
            "--batch-size", "4", "--mixed-precision", "mixed_bfloat16", "--out", out]
    assert cli_main(argv) == 0
    config = calls["config"]
    source = data.CocoDataset(*coco_files)
    assert config.name == "coco_r50_fpn" and config.image_size == 256 and config.batch_size == 4
    assert config.mixed_precision == "mixed_bfloat16"
    assert config.class_names == tuple(source.category_names) and config.num_classes == source.num_classes
    assert calls["steps"] is None and calls["minutes"] is None  # the preset's own length (train_images)
    assert isinstance(calls["strategy"], tf.distribute.Strategy)
    assert cli_main(argv[:-4] + ["--image-size", "100", "--out", out]) == 2
    assert "multiple of 32" in capsys.readouterr().err


# ----------------------------------------------------------------------------- mixed precision
def test_mixed_bfloat16_trains_with_float32_where_it_matters(tmp_path):
    config = tiny_config(mixed_precision="mixed_bfloat16", checkpoint_every=100)
    model = MaskRCNN(config).build_all()
    assert keras.config.dtype_policy().name == "float32"  # the model's policy did not leak
    assert model.box_head.dtype_policy.name == "mixed_bfloat16" and model.rpn_head.compute_dtype == "bfloat16"
    assert model.box_pooler.dtype_policy.name == "float32" and model.proposal_layer.compute_dtype == "float32"
    assert all(w.dtype == "float32" for w in model.weights)  # variables stay float32
    initial = model.get_weights()
    batches = train.training_batches(_mnist_scenes(config), config)
    history = train.fit(model, batches, config, str(tmp_path), steps=3, verbose=0)
    assert history["step"] == [1, 2, 3]
    assert all(np.isfinite(history[name]).all() for name in LOSS_NAMES)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, model.get_weights()))
    batch = {k: tf.constant(v) for k, v in synthetic_batch(config, (2, 1)).items()}
    assert all(v.dtype == tf.float32 for v in model.compute_losses(batch).values())
    objectness, deltas = model.rpn(model.features(batch["image"]))
    assert objectness.dtype == deltas.dtype == tf.float32
    detections = model(batch["image"])
    assert detections["boxes"].dtype == detections["masks"].dtype == tf.float32
    restored = keras.models.load_model(str(tmp_path / "checkpoints" / "last.keras"))  # the policy comes back
    assert restored.box_head.dtype_policy.name == "mixed_bfloat16"
    assert restored.box_pooler.dtype_policy.name == "float32"


def _mnist_scenes(config, n=8):
    from synthetic_data import MnistDetection

    return MnistDetection("train", n, 0, image_size=config.image_size, max_digits=3, digit_size=(14, 30))


def test_mixed_float16_wraps_the_optimizer_in_loss_scaling():
    optimizer = train.make_optimizer(tiny_config(mixed_precision="mixed_float16"), 10)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(train.make_optimizer(tiny_config(), 10), keras.optimizers.AdamW)
    with pytest.raises(ValueError, match="mixed_precision"):
        MaskRCNN(tiny_config(mixed_precision="float8"))


# ----------------------------------------------------------------------------- tf.distribute
# The equality test: every sampler keeps all its candidates (more anchor samples than anchors,
# room for every proposal among the RoIs, all positives to the mask head), so the random draws,
# which differ per replica, cannot matter; BatchNorm is frozen (per-replica batch statistics would
# differ by construction); weight decay 0 and a clipping norm small enough to clip, so that the
# step is the clipped global gradient (Keras alone would clip each replica's part).
EQUALITY = dict(batch_size=4, freeze_batchnorm=True, optimizer="sgd", learning_rate=0.05, weight_decay=0.0,
                clipnorm=1.0, warmup_steps=0, rpn_samples_per_image=4096, rpn_positive_fraction=1.0,
                rois_per_image=64, roi_positive_fraction=1.0, mask_rois_per_image=64, checkpoint_every=1000)
OBJECTS = (2, 0, 3, 1)  # per image: the two replicas get different numbers of objects


def one_sgd_step(strategy, run_dir, initial):
    """One training step from ``initial`` weights under ``strategy`` -> (model, batches, losses, images per replica)."""
    config = tiny_config(**EQUALITY)
    batches = tf.data.Dataset.from_tensors(synthetic_batch(config, OBJECTS, seed=3)).repeat()
    with strategy.scope():
        model = MaskRCNN(config).build_all()
    model.set_weights(initial)
    history = train.fit(model, batches, config, run_dir, steps=1, verbose=0, strategy=strategy)
    first = next(iter(strategy.experimental_distribute_dataset(batches)))["image"]
    per_replica = [int(x.shape[0]) for x in strategy.experimental_local_results(first)]
    return model, batches, {name: history[name][0] for name in LOSS_NAMES}, per_replica


def nan_step(model, batches, bad_batch_path):
    """The NaN guard under the model's strategy: one more step after a NaN weight -> what it did.

    Re-uses the compiled step (Keras' model.fit, no new compile) with train.StepLog, which
    stops on a non-finite step as in train.fit.
    """
    bias = model.box_head.class_logits.bias
    bias.assign(np.full(bias.shape, np.nan, np.float32))  # every class logit NaN, on every replica
    model.bad_batch_path = bad_batch_path
    before = [w.copy() for w in model.get_weights()]
    log = train.StepLog()
    with model.distribute_strategy.scope():
        model.fit(batches, steps_per_epoch=1, epochs=1, verbose=0, callbacks=[log])
    unchanged = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, model.get_weights()))
    return {"iterations": int(model.optimizer.iterations.numpy()), "unchanged": unchanged,
            "message": getattr(log, "message", "")}


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    # two logical CPU devices: must be set before TensorFlow initializes its devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_scaling import nan_step, one_sgd_step
    initial = np.load({initial!r})
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, batches, losses, per_replica = one_sgd_step(strategy, {run_dir!r},
                                                       [initial[k] for k in sorted(initial, key=int)])
    np.savez({out!r}, **{{str(i): w for i, w in enumerate(model.get_weights())}})
    nan = nan_step(model, batches, {out!r} + ".nan.npz")
    json.dump({{"losses": losses, "per_replica": per_replica, "replicas": strategy.num_replicas_in_sync,
               "nan": nan}}, open({out!r} + ".json", "w"))
""")


def test_mirrored_strategy_step_equals_the_single_device_step(tmp_path):
    """Two replicas (a subprocess: logical devices must be set up before TensorFlow starts) take
    the same step as one device on the same batch, each replica seeing half of it; then a NaN
    weight shows the NaN guard skipping the step on both."""
    config = tiny_config(**EQUALITY)
    keras.utils.set_random_seed(0)
    initial = MaskRCNN(config).build_all().get_weights()
    np.savez(tmp_path / "initial.npz", **{str(i): w for i, w in enumerate(initial)})
    out = str(tmp_path / "mirrored.npz")
    script = MIRRORED_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), initial=str(tmp_path / "initial.npz"),
                                    run_dir=str(tmp_path / "mirrored"), out=out)
    log = open(tmp_path / "child.log", "w")
    # the two-replica run in its own process, while this one takes the single-device step
    child = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        model, _, losses, per_replica = one_sgd_step(tf.distribute.get_strategy(), str(tmp_path / "single"), initial)
        after = model.get_weights()
        assert child.wait(timeout=600) == 0, open(tmp_path / "child.log").read()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    mirrored = np.load(out)
    report = json.load(open(out + ".json"))
    assert report["replicas"] == 2 and report["per_replica"] == [2, 2] and per_replica == [4]
    for name in LOSS_NAMES:  # the global batch's losses, from the shares of the two replicas
        assert report["losses"][name] == pytest.approx(losses[name], rel=1e-4, abs=1e-7), name
    # the same step: compare the weight changes (SGD's first step is -lr x the clipped gradient)
    single_step = [a - b for a, b in zip(after, initial)]
    mirrored_step = [mirrored[str(i)] - b for i, b in enumerate(initial)]
    norm = np.sqrt(sum(float(np.sum(d ** 2)) for d in single_step))
    difference = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(single_step, mirrored_step)))
    # The tolerance is the floor of float32 arithmetic in other kernels, not of the distribution:
    # with the same kernels the steps differ by 7e-6 of the norm, but the CI machine's CPU (like
    # TF_ENABLE_ONEDNN_OPTS=0 in the child here) gives 1.4e-3, spread over the backbone, whose
    # small gradients are sums that nearly cancel.  What the test guards against is of order 1:
    # clipping each replica's half, averaging the losses over the replicas twice, per-replica BN.
    assert norm > 0 and difference <= 1e-2 * norm, f"the steps differ by {difference / norm:.2e} of their norm"

    # the NaN guard across replicas: the step is skipped on both (no update, no optimizer step),
    # training stops, and the whole global batch is saved (both replicas' halves, in order)
    nan = report["nan"]
    assert nan["iterations"] == 1 and nan["unchanged"] and "non-finite loss at step 2" in nan["message"]
    saved = np.load(out + ".nan.npz")
    np.testing.assert_array_equal(saved["image"], synthetic_batch(tiny_config(**EQUALITY), OBJECTS, seed=3)["image"])
