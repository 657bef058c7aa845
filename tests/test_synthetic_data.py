"""Tests of synthetic_data.mnist and synthetic_data.scenes (MNIST-detection scenes).

The invariants of a scene are checked against brute-force numpy references written
for reading (pixel loops for boxes and occlusion) and against minimask.boxes.iou.
"""
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minimask.boxes
import synthetic_data
from synthetic_data import mnist
from synthetic_data.scenes import MnistDetection, iou_one_to_many, occlude

SAMPLE_KEYS = {"image", "boxes", "class_ids", "masks", "image_id", "digit_index"}


@pytest.fixture(scope="module")
def train_set():
    return MnistDetection("train", num_scenes=60, seed=0)


# ---------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------


def reference_tight_box(mask):
    """(y1, x1, y2, x2) of a non-empty bool [H, W] mask by visiting every ink pixel."""
    y1 = x1 = np.inf
    y2 = x2 = -np.inf
    for y, x in zip(*np.nonzero(mask)):
        y1, x1 = min(y1, y), min(x1, x)
        y2, x2 = max(y2, y + 1), max(x2, x + 1)
    return np.array([y1, x1, y2, x2], np.float32)


def reference_visible(full_masks):
    """Occlusion by a pixel loop: a digit's pixel is visible if no later digit inks it."""
    k_count, height, width = full_masks.shape
    visible = np.zeros_like(full_masks)
    for k in range(k_count):
        for y in range(height):
            for x in range(width):
                covered = any(full_masks[later, y, x] for later in range(k + 1, k_count))
                visible[k, y, x] = full_masks[k, y, x] and not covered
    return visible


def check_scene(dataset, index):
    """Assert every invariant of scene ``index`` of ``dataset`` against the references."""
    sample = dataset[index]
    layers = dataset.draw(index)
    size = dataset.image_size
    n = len(sample["class_ids"])
    # Conventions: shapes and dtypes.
    assert set(sample) == SAMPLE_KEYS
    assert sample["image"].shape == (size, size, 3) and sample["image"].dtype == np.uint8
    assert sample["boxes"].shape == (n, 4) and sample["boxes"].dtype == np.float32
    assert sample["class_ids"].dtype == np.int32
    assert sample["masks"].shape == (n, size, size) and sample["masks"].dtype == bool
    assert sample["digit_index"].shape == (n,) and sample["digit_index"].dtype == np.int32
    assert sample["image_id"] == index + 1
    # The annotation is the drawn image plus the reference occlusion and dropping rule.
    np.testing.assert_array_equal(sample["image"], layers.image)
    visible = reference_visible(layers.full_masks)
    fraction = visible.sum((1, 2)) / np.maximum(layers.full_masks.sum((1, 2)), 1)
    keep = (visible.sum((1, 2)) > 0) & (fraction >= dataset.min_visible)
    np.testing.assert_array_equal(sample["masks"], visible[keep])
    np.testing.assert_array_equal(sample["digit_index"], layers.digit_index[keep])
    # Classes: digit + 1, in 1..10.
    labels = dataset.digit_labels[sample["digit_index"]]
    np.testing.assert_array_equal(sample["class_ids"], labels.astype(np.int32) + 1)
    assert np.all((sample["class_ids"] >= 1) & (sample["class_ids"] <= 10))
    # Masks non-empty, never overlapping, boxes tight.
    assert np.all(sample["masks"].sum((1, 2)) > 0)
    assert sample["masks"].sum(axis=0).max(initial=0) <= 1
    for mask, box in zip(sample["masks"], sample["boxes"]):
        np.testing.assert_array_equal(box, reference_tight_box(mask))
    # Digit patches: side within digit_size, pairwise IoU capped (checked with minimask.boxes.iou).
    sides = layers.squares[:, 2] - layers.squares[:, 0]
    np.testing.assert_array_equal(sides, layers.squares[:, 3] - layers.squares[:, 1])
    assert np.all((sides >= dataset.digit_size[0]) & (sides <= dataset.digit_size[1]))
    assert len(sides) <= dataset.max_digits
    if len(sides) > 1:
        ious = minimask.boxes.iou(layers.squares, layers.squares).numpy()
        np.fill_diagonal(ious, 0.0)
        assert ious.max() <= dataset.max_overlap + 1e-6
    box_sizes = sample["boxes"][:, 2:] - sample["boxes"][:, :2]
    assert np.all(box_sizes <= dataset.digit_size[1])
    return sample


# ---------------------------------------------------------------------------
# MNIST digits and pools
# ---------------------------------------------------------------------------


def test_load_mnist_bundled_shapes():
    images, labels = synthetic_data.load_mnist()
    assert images.shape == (8000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (8000,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0


def test_load_mnist_rejects_unknown_source():
    with pytest.raises(ValueError, match="unknown MNIST source"):
        synthetic_data.load_mnist("internet")


@pytest.fixture
def no_keras_cache(monkeypatch, tmp_path):
    """Point keras' cache at an empty folder so the download path is taken."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))


def test_keras_offline_fails_before_calling_keras(monkeypatch, no_keras_cache):
    monkeypatch.setattr(mnist, "host_reachable", lambda *args, **kwargs: False)

    def must_not_be_called():
        raise AssertionError("keras must not be called when the host is unreachable")

    monkeypatch.setattr(mnist, "_keras_load_data", must_not_be_called)
    with pytest.raises(RuntimeError, match="could not download MNIST.*source='bundled'"):
        synthetic_data.load_mnist("keras")


def test_keras_download_error_becomes_clear_runtime_error(monkeypatch, no_keras_cache):
    monkeypatch.setattr(mnist, "host_reachable", lambda *args, **kwargs: True)
    timeouts_during_call = []

    def failing_download():
        timeouts_during_call.append(socket.getdefaulttimeout())
        raise OSError("connection reset")

    monkeypatch.setattr(mnist, "_keras_load_data", failing_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError, match="could not download MNIST.*source='bundled'"):
        synthetic_data.load_mnist("keras")
    assert timeouts_during_call == [mnist.DOWNLOAD_TIMEOUT_S]  # the download cannot hang
    assert socket.getdefaulttimeout() == before  # and the global timeout is restored


def test_keras_source_concatenates_train_and_test(monkeypatch, no_keras_cache):
    monkeypatch.setattr(mnist, "host_reachable", lambda *args, **kwargs: True)
    x_train, y_train = np.full((6, 28, 28), 1, np.uint8), np.arange(6, dtype=np.uint8)
    x_test, y_test = np.full((1, 28, 28), 2, np.uint8), np.array([9], np.uint8)
    monkeypatch.setattr(mnist, "_keras_load_data", lambda: ((x_train, y_train), (x_test, y_test)))
    images, labels = synthetic_data.load_mnist("keras")
    assert images.shape == (7, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 9])
    assert images[-1, 0, 0] == 2


def test_real_keras_source_fails_fast_when_offline(no_keras_cache):
    """On a machine without internet (CI), the real call raises within seconds."""
    if mnist.host_reachable():
        pytest.skip("the MNIST host is reachable: not downloading 11 MB in a test")
    with pytest.raises(RuntimeError, match="source='bundled'"):
        synthetic_data.load_mnist("keras")


def test_split_pools_are_disjoint_and_cover_everything():
    pools = synthetic_data.split_pools(1000, fractions=(0.8, 0.1, 0.1), seed=0)
    assert [len(pools[s]) for s in ("train", "val", "test")] == [800, 100, 100]
    everything = np.concatenate(list(pools.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(1000))  # each index exactly once
    again = synthetic_data.split_pools(1000, seed=0)
    other = synthetic_data.split_pools(1000, seed=1)
    assert all(np.array_equal(pools[s], again[s]) for s in pools)
    assert not np.array_equal(pools["test"], other["test"])


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1)])
def test_split_pools_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        synthetic_data.split_pools(100, fractions=fractions)


def test_scenes_of_each_split_use_only_their_pool():
    pools = synthetic_data.split_pools(8000)
    for split in ("train", "val", "test"):
        dataset = MnistDetection(split, num_scenes=40, seed=3)
        np.testing.assert_array_equal(dataset.pool, pools[split])
        drawn = np.concatenate([dataset.draw(i).digit_index for i in range(len(dataset))])
        assert len(drawn) > 40
        assert np.isin(drawn, pools[split]).all(), split  # every drawn digit, annotated or not
    # The pools do not depend on the scene seed.
    np.testing.assert_array_equal(MnistDetection("test", 1, seed=7).pool, pools["test"])


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


def test_dataset_attributes(train_set):
    assert len(train_set) == 60
    assert train_set.num_classes == 10
    assert train_set.category_names == ["background"] + [str(d) for d in range(10)]


def test_scene_invariants_on_default_config(train_set):
    counts = [len(check_scene(train_set, i)["class_ids"]) for i in range(0, 60, 3)]
    assert max(counts) >= 3  # the default scenes are crowded enough to test occlusion


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    index=st.integers(0, 9),
    max_digits=st.integers(0, 8),
    max_overlap=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    min_visible=st.floats(0.0, 1.0),
)
def test_scene_invariants_hold_for_any_config(seed, index, max_digits, max_overlap, min_visible):
    dataset = MnistDetection(
        "val", num_scenes=10, seed=seed, image_size=40, min_digits=0, max_digits=max_digits,
        digit_size=(8, 32), max_overlap=max_overlap, min_visible=min_visible,
        empty_fraction=0.1,
    )
    check_scene(dataset, index)


def test_occlusion_hides_digits_and_drops_mostly_hidden_ones():
    """With heavy overlap allowed, some digits must be partly hidden and some dropped."""
    dataset = MnistDetection("train", num_scenes=30, seed=1, image_size=48, digit_size=(24, 40),
                             min_digits=4, max_digits=6, max_overlap=1.0, min_visible=0.5,
                             empty_fraction=0.0)
    partly_hidden = dropped = 0
    for i in range(len(dataset)):
        layers = dataset.draw(i)
        visible = occlude(layers.full_masks)
        fraction = visible.sum((1, 2)) / np.maximum(layers.full_masks.sum((1, 2)), 1)
        partly_hidden += int(np.sum((fraction < 1) & (fraction >= 0.5)))
        dropped += len(layers.digit_index) - len(dataset[i]["class_ids"])
    assert partly_hidden > 0 and dropped > 0


def test_occlude_matches_pixel_loop():
    rng = np.random.default_rng(0)
    full = rng.random((5, 9, 7)) < 0.4
    np.testing.assert_array_equal(occlude(full), reference_visible(full))
    assert occlude(np.zeros((0, 9, 7), bool)).shape == (0, 9, 7)


def test_digits_are_painted_bright_on_a_dark_background(train_set):
    for i in range(5):
        sample, layers = train_set[i], train_set.draw(i)
        for mask in sample["masks"]:
            # ink >= 128/255 of a colour with one channel at 255, over a background < 80
            assert sample["image"][mask].max(axis=-1).min() >= 120
        outside = np.ones(sample["image"].shape[:2], bool)
        for y1, x1, y2, x2 in layers.squares:
            outside[y1:y2, x1:x2] = False
        assert sample["image"][outside].max() < 80


@pytest.mark.parametrize("size", [32, 128])
def test_empty_scenes_have_zero_length_arrays(size):
    dataset = MnistDetection("test", num_scenes=5, seed=0, image_size=size, empty_fraction=1.0,
                             digit_size=(8, 16))
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["boxes"].shape == (0, 4) and sample["boxes"].dtype == np.float32
        assert sample["class_ids"].shape == (0,) and sample["class_ids"].dtype == np.int32
        assert sample["masks"].shape == (0, size, size) and sample["masks"].dtype == bool
        assert sample["digit_index"].shape == (0,)
        assert sample["image"].shape == (size, size, 3)


def test_empty_fraction_controls_the_share_of_empty_scenes():
    def empty_count(fraction):
        # Digits of 14 pixels or more always keep some ink >= 128 after resizing (at 8
        # pixels, 7% of them fade below it and cannot be annotated).
        dataset = MnistDetection("train", num_scenes=200, seed=0, image_size=32,
                                 digit_size=(14, 20), max_digits=2, empty_fraction=fraction)
        return sum(len(dataset[i]["class_ids"]) == 0 for i in range(len(dataset)))

    assert empty_count(0.0) == 0  # the last digit drawn is never occluded
    assert 60 <= empty_count(0.5) <= 140


def assert_samples_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype


def test_samples_are_deterministic_whatever_the_access_order():
    in_order = MnistDetection("train", num_scenes=12, seed=5)
    forwards = [in_order[i] for i in range(12)]
    shuffled = MnistDetection("train", num_scenes=12, seed=5)
    for i in [7, 3, 11, 0, 3, 7]:
        assert_samples_equal(shuffled[i], forwards[i])
    assert_samples_equal(in_order[-1], forwards[11])
    # A longer dataset with the same seed starts with the same scenes.
    assert_samples_equal(MnistDetection("train", num_scenes=1000, seed=5)[4], forwards[4])


def test_different_seeds_and_splits_give_different_scenes():
    base = MnistDetection("train", num_scenes=3, seed=0)[2]["image"]
    assert not np.array_equal(base, MnistDetection("train", num_scenes=3, seed=1)[2]["image"])
    assert not np.array_equal(base, MnistDetection("val", num_scenes=3, seed=0)[2]["image"])
    # Not only the digits differ between splits: the layouts do too (the split is in the seed).
    train, val = MnistDetection("train", 5, seed=0), MnistDetection("val", 5, seed=0)
    layouts = [(train.draw(i).squares, val.draw(i).squares) for i in range(5)]
    assert not all(np.array_equal(a, b) for a, b in layouts)


def test_iou_one_to_many_matches_minimask_iou():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 50, (21, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # [21, 4]
    boxes[3] = [5, 5, 5, 9]  # an empty box
    expected = minimask.boxes.iou(boxes[:1], boxes[1:]).numpy()[0]
    np.testing.assert_allclose(iou_one_to_many(boxes[0], boxes[1:]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"split": "training"}, "split"),
        ({"num_scenes": -1}, "num_scenes"),
        ({"seed": -3}, "seed"),
        ({"min_digits": 3, "max_digits": 2}, "min_digits"),
        ({"empty_fraction": 1.5}, "empty_fraction"),
        ({"digit_size": (14, 200)}, "digit_size"),
        ({"digit_size": (0, 20)}, "digit_size"),
        ({"max_overlap": -0.1}, "max_overlap"),
        ({"min_visible": 2.0}, "min_visible"),
    ],
)
def test_bad_config_raises_a_named_error(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        MnistDetection(**kwargs)


def test_index_out_of_range(train_set):
    with pytest.raises(IndexError):
        train_set[60]
    with pytest.raises(IndexError):
        train_set[-61]
    with pytest.raises(TypeError):
        train_set[1.0]
