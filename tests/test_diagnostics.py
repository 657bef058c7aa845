"""minimask.diagnostics: every planted bug is caught, every healthy case passes.

The planted bugs are those of the course's lesson 12: a large classifier / objectness bias,
labels shifted by one, a frozen head, a learning rate that explodes into NaN, anchors too large
for the digits, a wrong stride, a transposed box convention, broken samples in a data set, a
leaking data source.  Models are the tiny 64x64 test config; training checks take a few hundred
steps on one image.  Numbers are compared with independent references (hand-worked receptive
fields, a numpy IoU, numpy histograms).
"""
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import keras  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conftest import synthetic_batch, tiny_config  # noqa: E402
from minimask import diagnostics  # noqa: E402
from minimask import anchors as anchor_ops  # noqa: E402
from minimask.boxes import boxes_from_masks  # noqa: E402
from minimask.model import LOSS_NAMES, MaskRCNN  # noqa: E402
from synthetic_data import MnistDetection  # noqa: E402


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def model(config):
    keras.utils.set_random_seed(0)
    return MaskRCNN(config).build_all()


@pytest.fixture(scope="module")
def digits():
    """40 MNIST scenes of the tiny config's size, digits 14-30 px."""
    return MnistDetection("train", 40, 0, image_size=64, max_digits=3, digit_size=(14, 30))


@pytest.fixture(scope="module")
def digit_boxes(digits, config):
    return diagnostics.collect_boxes(digits, config)


def one_image_batch(config, seed=1):
    return synthetic_batch(config.replace(batch_size=1), (3,), seed=seed)


# ---------------------------------------------------------------------------------------- initial losses


def test_expected_initial_losses_are_those_of_uniform_guesses():
    # independent reference: cross-entropy of a uniform guess, -log(1 / number of outcomes)
    expected = diagnostics.expected_initial_losses(10)
    assert expected["rpn_class"] == pytest.approx(-math.log(0.5))
    assert expected["class"] == pytest.approx(-math.log(1 / 11))
    assert expected["mask"] == pytest.approx(-math.log(0.5))


def test_initial_losses_of_a_fresh_model_pass(model, capsys):
    result = diagnostics.check_initial_losses(model, synthetic_batch(model.config, (3, 1)))
    assert result.ok, result.verdict
    assert set(result.losses) == set(LOSS_NAMES)
    assert abs(result.objectness_logit_mean) < 0.05
    assert capsys.readouterr().out.startswith("check_initial_losses: PASS")


@pytest.mark.parametrize("layer, bias, loss, words", [
    ("class_logits", "one class +5", "class", "class 1"),  # a classifier bias initialised large
    ("class_logits", "background +4.6", "class", "class 0"),  # "background prior" on the softmax
    ("objectness", "-4.6", "rpn_class", "objectness logits start at -4.6"),  # focal-loss prior on the RPN
])
def test_initial_losses_catch_a_large_initial_bias(model, layer, bias, loss, words):
    head = model.box_head.class_logits if layer == "class_logits" else model.rpn_head.objectness
    original = head.bias.numpy()
    planted = np.zeros_like(original)
    if bias == "one class +5":
        planted[1] = 5.0
    elif bias == "background +4.6":
        planted[0] = 4.6
    else:
        planted[:] = -4.6
    head.bias.assign(planted)
    try:
        result = diagnostics.check_initial_losses(model, synthetic_batch(model.config, (3, 1)), verbose=False)
    finally:
        head.bias.assign(original)
    assert not result.ok
    assert [p for p in result.problems if p.startswith(loss + " =")], result.verdict
    assert words in result.verdict


def test_initial_losses_catch_labels_shifted_by_one(model):
    batch = synthetic_batch(model.config, (3, 1))
    batch["class_ids"][0, :3] = [1, 4, 10]
    batch["class_ids"][1, 0] = 7
    zero_based = {**batch, "class_ids": batch["class_ids"] - 1}  # digit instead of digit + 1
    result = diagnostics.check_initial_losses(model, zero_based, verbose=False)
    assert not result.ok and "class id 0" in result.verdict and "shifted by one" in result.verdict
    one_too_many = {**batch, "class_ids": batch["class_ids"] + 1}  # ids 2..11 with K = 10
    result = diagnostics.check_initial_losses(model, one_too_many, verbose=False)  # must not crash in the loss
    assert not result.ok and "[11]" in result.verdict and "losses not computed" in result.verdict


def test_initial_losses_accept_a_list_of_samples_and_reject_other_sizes(model, digits):
    result = diagnostics.check_initial_losses(model, [digits[i] for i in range(2)], verbose=False)
    assert result.ok, result.verdict
    with pytest.raises(ValueError, match="letterbox"):
        diagnostics.check_initial_losses(model, synthetic_batch(tiny_config(image_size=96), (1,)), verbose=False)


# ---------------------------------------------------------------------------------------- training on one batch


def test_a_healthy_model_overfits_one_batch(config):
    result = diagnostics.check_overfit(config, one_image_batch(config), steps=300, verbose=False)
    assert result.ok, result.verdict
    assert result.steps_run <= 300 and not result.failed
    for name in LOSS_NAMES:
        assert result.final[name] < diagnostics.OVERFIT_THRESHOLDS[name]
    assert len(result.history["rpn_class"]) == result.steps_run


def test_overfit_names_the_loss_of_a_frozen_head_and_leaves_the_model_alone(model, config):
    before = [w.copy() for w in model.get_weights()]
    model.mask_head.trainable = False  # planted bug: a head left frozen
    try:
        # the frozen head never learns, so a short run shows it (the healthy losses need ~200 steps)
        result = diagnostics.check_overfit(model, one_image_batch(config), steps=2 * diagnostics.OVERFIT_WINDOW,
                                           verbose=False)
    finally:
        model.mask_head.trainable = True
    assert not result.ok and "mask" in result.failed
    assert result.final["mask"] == pytest.approx(math.log(2), abs=0.01)  # not a step of progress
    assert "mask did not fall" in result.verdict and "mask head has no trainable weights" in result.verdict
    for a, b in zip(before, model.get_weights()):  # the check trained a copy
        np.testing.assert_array_equal(a, b)


def test_the_configured_learning_rate_passes(config):
    result = diagnostics.check_learning_rate(config, one_image_batch(config), steps=diagnostics.LR_WINDOW + 5,
                                             verbose=False)
    assert result.ok, result.verdict
    assert result.learning_rate == pytest.approx(config.learning_rate)  # lr_reference_batch 0: no scaling
    assert result.nonfinite_step is None and result.weights_finite


def test_an_exploding_learning_rate_is_stopped_and_named(config, tmp_path):
    """Extends tests/test_train.py's NaN-guard test (which checks the run directory and the
    checkpoint): here the model in memory keeps finite weights, and nan_batch.npz holds the whole
    batch, every key, so that the failure can be replayed."""
    batch = one_image_batch(config)
    path = tmp_path / "nan_batch.npz"
    sgd = config.replace(optimizer="sgd", clipnorm=0.0)
    result = diagnostics.check_learning_rate(sgd, batch, learning_rate=1e12, steps=40, bad_batch_path=str(path),
                                             verbose=False)
    assert not result.ok
    step = result.nonfinite_step
    assert isinstance(step, int) and 1 <= step == result.steps_run < 40
    assert f"non-finite loss at step {step}:" in result.verdict
    assert result.nonfinite_terms and set(result.nonfinite_terms) <= set(LOSS_NAMES) | {"(a gradient)"}
    assert all(term in result.verdict for term in result.nonfinite_terms)
    assert result.weights_finite  # the non-finite update was never applied
    saved = np.load(path)
    assert set(saved.files) == set(batch)
    for key, value in batch.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------- anchors and strides


def numpy_iou(a, b):
    """IoU of every box of a [N, 4] with every box of b [M, 4], in plain numpy (reference)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    areas_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    areas_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / (areas_a[:, None] + areas_b[None, :] - inter)


def test_anchor_coverage_of_the_test_config_passes(config, digit_boxes):
    result = diagnostics.check_anchor_coverage(config, digit_boxes, verbose=False)
    assert result.ok, result.verdict
    assert result.suggested_scales is None
    anchors = anchor_ops.generate_anchors((64, 64), config.anchor_strides, config.anchor_scales, config.anchor_ratios)
    best = numpy_iou(anchors, np.concatenate(digit_boxes)).max(axis=0)
    assert result.weak_share == pytest.approx(np.mean(best < config.rpn_negative_iou))
    assert result.uncovered_share == pytest.approx(np.mean(best < config.rpn_positive_iou))


def test_anchors_too_large_for_the_digits_are_caught_with_a_suggestion(config, digit_boxes):
    too_large = config.replace(anchor_scales=tuple(tuple(4 * s for s in level) for level in config.anchor_scales))
    result = diagnostics.check_anchor_coverage(too_large, digit_boxes, verbose=False)
    assert not result.ok and result.weak_share > 0.5
    assert "Suggested: anchor_scales=" in result.verdict
    # the suggestion really fixes it
    fixed = diagnostics.check_anchor_coverage(too_large.replace(anchor_scales=result.suggested_scales), digit_boxes,
                                              verbose=False)
    assert fixed.ok and fixed.weak_share == pytest.approx(result.suggested_coverage["weak_share"])


def test_pyramid_geometry_matches_a_hand_worked_receptive_field():
    # micro_resnet: stem 3x3/2 conv then 3x3/2 max pool: field 3, then 3 + 2 * 2 = 7 at jump 4.
    # C2 = one basic block, two 3x3 convs at jump 4: 7 + 8 + 8 = 23.  C3: 3x3/2 then 3x3 at jump 8:
    # 23 + 8 + 16 = 47.  FPN's 3x3 smoothing adds 2 x stride, the RPN's 3x3 again.
    levels = diagnostics.pyramid_geometry("micro_resnet")
    assert [lv["stride"] for lv in levels] == [4, 8, 16, 32, 64]
    assert (levels[0]["receptive_field"], levels[0]["rpn_window"]) == (23 + 8, 23 + 16)
    assert (levels[1]["receptive_field"], levels[1]["rpn_window"]) == (47 + 16, 47 + 32)
    assert levels[4]["receptive_field"] == levels[3]["receptive_field"]  # P6 subsamples P5 (1x1 pool)
    assert levels[4]["rpn_window"] == levels[3]["receptive_field"] + 2 * 64


def test_receptive_field_of_the_test_config_passes(config, digit_boxes):
    result = diagnostics.check_receptive_field(config, digit_boxes, verbose=False)
    assert result.ok, result.verdict
    assert sum(level["num_boxes"] for level in result.levels) == len(np.concatenate(digit_boxes))
    assert result.small_share == 0.0


def test_a_wrong_stride_is_caught(config, digit_boxes):
    wrong = config.replace(anchor_strides=(8, 16, 32, 64, 128))  # one level off: the maps are 4..64
    result = diagnostics.check_receptive_field(wrong, digit_boxes, verbose=False)
    assert not result.ok
    assert "anchor_strides (8, 16, 32, 64, 128)" in result.verdict and "(4, 8, 16, 32, 64)" in result.verdict


def test_objects_smaller_than_the_finest_stride_are_caught(config):
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 56, size=(50, 2))
    tiny = np.concatenate([corners, corners + 3.0], axis=1)  # 3-pixel objects, stride 4
    result = diagnostics.check_receptive_field(config, tiny, verbose=False)
    assert not result.ok and result.small_share == 1.0
    assert "smaller (sqrt area) than the finest anchor stride 4" in result.verdict


# ---------------------------------------------------------------------------------------- box convention


def test_boxes_of_the_generator_match_their_masks(digits):
    sample = digits[1]
    result = diagnostics.check_box_convention(sample["boxes"], sample["masks"], verbose=False)
    assert result.ok and result.match_share == 1.0 and result.interpretation == "(y1, x1, y2, x2)"


def test_a_transposed_box_convention_is_caught(digits):
    sample = digits[1]
    transposed = sample["boxes"][:, [1, 0, 3, 2]]  # (x1, y1, x2, y2): the classic bug
    result = diagnostics.check_box_convention(transposed, sample["masks"], verbose=False)
    assert not result.ok and len(result.mismatched) == len(transposed)
    assert result.interpretation.startswith("(x1, y1, x2, y2)") and "transposed" in result.verdict


def test_coco_boxes_read_as_corners_are_recognised(digits):
    sample = digits[1]
    y1, x1, y2, x2 = sample["boxes"].T
    xywh = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    result = diagnostics.check_box_convention(xywh, sample["masks"], verbose=False)
    assert not result.ok and result.interpretation == "COCO (x, y, w, h)"


def test_inverted_outside_and_inclusive_boxes():
    boxes = np.array([[10, 10, 5, 20], [0, 0, 40, 20], [2, 2, 2, 8]], np.float32)
    result = diagnostics.check_box_convention(boxes, image_size=(30, 60), verbose=False)
    assert list(result.inverted) == [0] and list(result.outside) == [1] and list(result.empty) == [2]
    assert "they would fit transposed" in result.verdict  # 40 > 30 rows, but (20, 40) fits 60 columns
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:18, 4:7] = True
    inclusive = np.array([[2, 3, 5, 8], [10, 4, 17, 6]], np.float32)  # last pixel, not last pixel + 1
    result = diagnostics.check_box_convention(inclusive, masks, verbose=False)
    assert "end one pixel short" in result.verdict


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(20, 60), st.integers(4, 12), st.integers(4, 12)),
                min_size=1, max_size=5))
def test_property_true_boxes_pass_and_off_diagonal_transposed_boxes_fail(rects):
    """Rectangles (row, col, h, w) away from the diagonal: their tight boxes always pass; the same
    boxes transposed never overlap their masks, so every one of them is flagged."""
    masks = np.zeros((len(rects), 80, 80), bool)
    for k, (row, col, h, w) in enumerate(rects):
        col = max(col, row + h + 1)  # columns start after the rows end: off the diagonal
        masks[k, row:row + h, col:col + w] = True
    boxes = boxes_from_masks(masks)
    assert diagnostics.check_box_convention(boxes, masks, verbose=False).ok
    flipped = diagnostics.check_box_convention(boxes[:, [1, 0, 3, 2]], masks, verbose=False)
    assert len(flipped.mismatched) == len(rects)


# ---------------------------------------------------------------------------------------- data set


class ListSource:
    """A data source from a list of samples (len and indexing, like CocoDataset)."""

    def __init__(self, samples, num_classes=10):
        self.samples, self.num_classes = samples, num_classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_the_generator_passes_check_dataset_and_the_histogram_is_right(digits, config):
    result = diagnostics.check_dataset(digits, config=config, verbose=False)
    assert result.ok, result.verdict
    ids = np.concatenate([digits[i]["class_ids"] for i in range(len(digits))])
    np.testing.assert_array_equal(result.class_histogram, np.bincount(ids, minlength=11))
    empty = [i for i in range(len(digits)) if len(digits[i]["boxes"]) == 0]
    assert result.empty_images == empty and len(empty) > 0  # reported, and legal
    assert "have no objects" in result.verdict and result.class_histogram[0] == 0


def test_check_dataset_finds_planted_problems(digits):
    samples = [dict(digits[i]) for i in range(6)]
    full = next(i for i, s in enumerate(samples) if len(s["boxes"]) >= 2)
    samples[full]["boxes"] = samples[full]["boxes"].copy()
    samples[full]["boxes"][0, 2] = samples[full]["boxes"][0, 0]  # a degenerate box: zero height
    samples[full]["class_ids"] = samples[full]["class_ids"].copy()
    samples[full]["class_ids"][1] = 11  # unknown class
    empty = {"image": samples[0]["image"], "boxes": np.zeros((0, 4), np.float32),
             "class_ids": np.zeros(0, np.int32), "masks": np.zeros((0, 64, 64), bool)}
    result = diagnostics.check_dataset(ListSource(samples + [empty]), verbose=False)
    assert not result.ok
    assert (full, 0) in result.degenerate and (full, 1, 11) in result.unknown_classes
    assert len(samples) in result.empty_images
    nothing = diagnostics.check_dataset(ListSource([empty, empty]), verbose=False)
    assert not nothing.ok and "none of the 2 images has an object" in nothing.verdict


def test_training_targets_are_drawn_after_letterbox_and_padding(digits, config):
    sample = next(digits[i] for i in range(len(digits)) if len(digits[i]["boxes"]) >= 2)
    # a 64 x 96 (h x w) image: the model sees it scaled by 2/3 with 21 rows of padding
    wide = {key: sample[key] for key in ("image", "boxes", "class_ids", "masks")}
    wide["image"] = np.concatenate([sample["image"], sample["image"][:, :32]], axis=1)
    wide["masks"] = np.concatenate([sample["masks"], np.zeros_like(sample["masks"][:, :, :32])], axis=2)
    view = diagnostics.training_view(config, wide)
    assert view["image"].shape == (64, 64, 3) and view["content_shape"] == (43, 64)
    n = int(view["num_instances"])
    assert n == len(sample["boxes"]) and view["dropped_by_resize"] == 0  # digits of >= 14 px survive x 2/3
    np.testing.assert_allclose(view["boxes"][:n], sample["boxes"][:n] * 64 / 96, atol=1.5)  # reference: scaling
    figure = Figure()
    ax = diagnostics.draw_training_targets(config, wide, ax=figure.add_subplot())
    assert "scale 0.67" in ax.get_title() and f"{n} objects" in ax.get_title()


# ---------------------------------------------------------------------------------------- memory


class LeakySource(ListSource):
    """Planted bug: a "cache" that keeps 64 KiB for every sample served (about a decoded 128x128 image)."""

    def __init__(self, samples):
        super().__init__(samples)
        self.kept = []

    def __getitem__(self, i):
        self.kept.append(np.ones(64 * 1024, np.uint8))
        return super().__getitem__(i)


def test_memory_of_a_flat_source_and_of_a_leaking_one(digits):
    samples = [digits[i] for i in range(8)]
    flat = diagnostics.measure_pipeline_memory(ListSource(samples), 800, pipelines=("source",), every=50,
                                               verbose=False)
    assert flat.ok, flat.verdict
    curve = flat.curves["source"]
    assert curve["samples"][0] == 0 and curve["samples"][-1] == 800 and len(curve["rss_mib"]) == 17
    leaky = diagnostics.measure_pipeline_memory(LeakySource(samples), 800, pipelines=("source",), every=50,
                                                verbose=False)
    # 64 KiB kept per sample: the traced heap sees exactly that (the RSS may not, yet: freed pages get reused)
    assert not leaky.ok and leaky.traced_slope_kib_per_sample["source"] == pytest.approx(64, rel=0.1)
    assert "memory grows" in leaky.verdict


def test_memory_through_tf_data(digits):
    result = diagnostics.measure_pipeline_memory(ListSource([digits[i] for i in range(8)]), 64, pipelines=("tf.data",),
                                                 batch_size=8, max_instances=4, every=16, verbose=False)
    assert result.curves["tf.data"]["samples"] == [0, 16, 32, 48, 64]
    assert all(rss > 0 for rss in result.curves["tf.data"]["rss_mib"])
    assert diagnostics.process_rss_mib() > 10
