"""Tests of minimask.data: CocoDataset reading valid files (all three segmentation kinds,
crowds, grayscale / RGBA images, empty images) against hand-built masks and a brute-force
box loop; pad_sample / collate; the tf.data pipeline against collate of the source samples
(order, seeds, reshuffling, parallel determinism, errors); and a round trip through the
synthetic COCO export.  Invalid COCO files are in tests/test_coco_errors.py."""
import json
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minimask.data import CocoDataset, collate, make_dataset, pad_sample, rle_string_to_counts


# ---------------------------------------------------------------------------
# Independent references, written for reading
# ---------------------------------------------------------------------------


def tight_box_loop(mask):
    """Box (y1, x1, y2, x2) of a bool [H, W] mask by visiting every pixel."""
    y1 = x1 = float("inf")
    y2 = x2 = -float("inf")
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            if mask[r, c]:
                y1, x1 = min(y1, r), min(x1, c)
                y2, x2 = max(y2, r + 1), max(x2, c + 1)
    return [y1, x1, y2, x2]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of a bool [H, W] mask: runs over the column-major pixels,
    starting with a (possibly empty) run of zeros."""
    counts, current, run = [], False, 0
    for value in mask.T.reshape(-1):  # column-major: down the first column, then the next
        if bool(value) != current:
            counts.append(run)
            current, run = bool(value), 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def rect_mask(h, w, y1, x1, y2, x2):
    mask = np.zeros((h, w), bool)
    mask[y1:y2, x1:x2] = True
    return mask


# ---------------------------------------------------------------------------
# A small valid COCO file with every kind of annotation
# ---------------------------------------------------------------------------

H, W = 12, 16


def build_coco(tmp_path):
    """Write a COCO file + images; return (json path, image dir, expected per-image content)."""
    from pycocotools import mask as mask_utils

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgb).save(image_dir / "rgb.png")
    Image.fromarray(gray).save(image_dir / "gray.png")
    Image.fromarray(rgba).save(image_dir / "rgba.png")

    polygon_mask = rect_mask(H, W, 1, 2, 4, 6) | rect_mask(H, W, 6, 3, 8, 5)  # two polygons
    odd_mask = np.zeros((H, W), bool)
    odd_mask[[2, 3, 3, 9, 10], [9, 9, 12, 10, 14]] = True  # scattered pixels
    compressed_mask = rect_mask(H, W, 7, 8, 11, 15)
    compressed = mask_utils.encode(np.asfortranarray(compressed_mask.astype(np.uint8)))
    rgba_mask = rect_mask(H, W, 0, 0, 12, 3)  # touches the image border
    categories = [  # deliberately not sorted by id
        {"id": 90, "name": "toothbrush"},
        {"id": 3, "name": "car"},
        {"id": 7, "name": "train"},
    ]
    annotations = [
        {"id": 11, "image_id": 5, "category_id": 7, "iscrowd": 0, "bbox": [2, 1, 4, 7],
         "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4], [3, 6, 5, 6, 5, 8, 3, 8]]},
        {"id": 12, "image_id": 5, "category_id": 3, "iscrowd": 0, "bbox": [9, 2, 6, 9],
         "segmentation": uncompressed_rle(odd_mask)},
        {"id": 13, "image_id": 5, "category_id": 90, "iscrowd": 1, "bbox": [0.5, 8, 3, 4.5],
         "segmentation": uncompressed_rle(rect_mask(H, W, 8, 0, 12, 4))},
        {"id": 14, "image_id": 5, "category_id": 90, "iscrowd": 0, "bbox": [8, 7, 7, 4],
         "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
        {"id": 15, "image_id": 9, "category_id": 3, "bbox": [0, 0, 3, 12],  # no iscrowd key
         "segmentation": [[0, 0, 3, 0, 3, 12, 0, 12]]},
    ]
    coco = {
        "images": [
            {"id": 5, "file_name": "rgb.png", "height": H, "width": W},
            {"id": 2, "file_name": "gray.png", "height": H, "width": W},
            {"id": 9, "file_name": "rgba.png", "height": H, "width": W},
        ],
        "annotations": annotations,
        "categories": categories,
    }
    json_path = tmp_path / "instances.json"
    json_path.write_text(json.dumps(coco))
    # contiguous ids: COCO 3 -> 1 ("car"), 7 -> 2 ("train"), 90 -> 3 ("toothbrush")
    expected = [
        dict(image=rgb, image_id=5, class_ids=[2, 1, 3],
             masks=[polygon_mask, odd_mask, compressed_mask], ignore_boxes=[[8, 0.5, 12, 3.5]]),
        dict(image=np.repeat(gray[:, :, None], 3, axis=2), image_id=2, class_ids=[],
             masks=[], ignore_boxes=[]),
        dict(image=rgba[:, :, :3], image_id=9, class_ids=[1], masks=[rgba_mask], ignore_boxes=[]),
    ]
    return json_path, image_dir, expected


@pytest.fixture
def coco(tmp_path):
    return build_coco(tmp_path)


def test_coco_categories_map_to_contiguous_ids_sorted_by_coco_id(coco):
    json_path, image_dir, _ = coco
    dataset = CocoDataset(json_path, image_dir)
    assert dataset.num_classes == 3
    assert dataset.category_names == ["background", "car", "train", "toothbrush"]
    assert dataset.coco_category_ids == [None, 3, 7, 90]
    assert dataset.image_ids == [5, 2, 9]
    assert len(dataset) == 3
    np.testing.assert_array_equal(dataset.image_sizes, [[H, W]] * 3)


def test_coco_samples_match_hand_built_masks_boxes_and_images(coco):
    json_path, image_dir, expected = coco
    dataset = CocoDataset(json_path, image_dir)
    for i, want in enumerate(expected):
        sample = dataset[i]
        n = len(want["masks"])
        assert sample["image_id"] == want["image_id"]
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (H, W, 3)
        np.testing.assert_array_equal(sample["image"], want["image"])
        assert sample["class_ids"].dtype == np.int32
        np.testing.assert_array_equal(sample["class_ids"], want["class_ids"])
        assert sample["masks"].dtype == bool and sample["masks"].shape == (n, H, W)
        np.testing.assert_array_equal(sample["masks"], np.reshape(want["masks"], (n, H, W)))
        assert sample["boxes"].dtype == np.float32 and sample["boxes"].shape == (n, 4)
        np.testing.assert_array_equal(
            sample["boxes"], np.reshape([tight_box_loop(m) for m in want["masks"]], (n, 4)))
        assert sample["ignore_boxes"].dtype == np.float32
        np.testing.assert_array_equal(sample["ignore_boxes"],
                                      np.reshape(want["ignore_boxes"], (-1, 4)))


def test_coco_image_without_annotations_has_empty_arrays(coco):
    dataset = CocoDataset(*coco[:2])
    sample = dataset[1]
    assert sample["boxes"].shape == (0, 4)
    assert sample["class_ids"].shape == (0,)
    assert sample["masks"].shape == (0, H, W)
    assert sample["ignore_boxes"].shape == (0, 4)


def test_coco_indexing_like_a_list(coco):
    dataset = CocoDataset(*coco[:2])
    assert dataset[-1]["image_id"] == 9
    assert dataset[np.int64(0)]["image_id"] == 5
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(IndexError):
        dataset[-4]
    assert [s["image_id"] for s in dataset] == [5, 2, 9]  # iteration stops at IndexError


def test_coco_validate_passes_on_a_valid_file(coco):
    dataset = CocoDataset(*coco[:2], validate_images=True)
    assert dataset.validate() is None
    assert "3 images" in repr(dataset)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), density=st.floats(0, 1),
       seed=st.integers(0, 999))
def test_rle_string_to_counts_reads_what_pycocotools_writes(h, w, density, seed):
    from pycocotools import mask as mask_utils

    mask = np.random.default_rng(seed).random((h, w)) < density
    string = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    assert rle_string_to_counts(string) == uncompressed_rle(mask)["counts"]


# ---------------------------------------------------------------------------
# pad_sample and collate
# ---------------------------------------------------------------------------


def make_sample(n, h=6, w=5, g=0, image_id=None, seed=0):
    rng = np.random.default_rng(seed)
    sample = {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "boxes": rng.uniform(0, 5, (n, 4)).astype(np.float32),
        "class_ids": rng.integers(1, 10, n).astype(np.int32),
        "masks": rng.random((n, h, w)) < 0.5,
        "ignore_boxes": rng.uniform(0, 5, (g, 4)).astype(np.float32),
    }
    if image_id is not None:
        sample["image_id"] = image_id
    return sample


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 4), extra=st.integers(0, 3), g=st.integers(0, 2), seed=st.integers(0, 99))
def test_pad_sample_keeps_the_valid_rows_and_counts_them(n, extra, g, seed):
    sample = make_sample(n, g=g, seed=seed)
    m = n + extra
    padded = pad_sample(sample, m, max_ignore=g + 1)
    assert padded["boxes"].shape == (m, 4) and padded["boxes"].dtype == np.float32
    assert padded["class_ids"].shape == (m,) and padded["class_ids"].dtype == np.int32
    assert padded["masks"].shape == (m, 6, 5) and padded["masks"].dtype == bool
    assert padded["ignore_boxes"].shape == (g + 1, 4)
    assert padded["num_instances"] == n and padded["num_instances"].dtype == np.int32
    assert padded["num_ignore"] == g and padded["num_ignore"].dtype == np.int32
    np.testing.assert_array_equal(padded["image"], sample["image"])
    for key in ("boxes", "class_ids", "masks"):
        np.testing.assert_array_equal(padded[key][:n], sample[key])
    np.testing.assert_array_equal(padded["ignore_boxes"][:g], sample["ignore_boxes"])


def test_pad_sample_too_many_instances_names_the_image_unless_truncating():
    sample = make_sample(5, g=3, image_id=42)
    with pytest.raises(ValueError, match=r"image id 42 has 5 instances.*maximum 4"):
        pad_sample(sample, 4, max_ignore=3)
    with pytest.raises(ValueError, match=r"image id 42 has 3 ignore boxes.*maximum 2"):
        pad_sample(sample, 5, max_ignore=2)
    cut = pad_sample(sample, 4, max_ignore=2, truncate=True)
    assert cut["num_instances"] == 4 and cut["num_ignore"] == 2
    np.testing.assert_array_equal(cut["masks"], sample["masks"][:4])
    np.testing.assert_array_equal(cut["ignore_boxes"], sample["ignore_boxes"][:2])


def test_pad_sample_without_ignore_key_and_with_bad_shapes():
    sample = make_sample(2)
    del sample["ignore_boxes"]
    padded = pad_sample(sample, 3, max_ignore=2)
    assert padded["num_ignore"] == 0 and padded["ignore_boxes"].shape == (2, 4)
    bad = make_sample(2)
    bad["class_ids"] = bad["class_ids"][:1]
    with pytest.raises(ValueError, match="class_ids"):
        pad_sample(bad, 3)
    bad = make_sample(2)
    bad["masks"] = bad["masks"][:, :-1]
    with pytest.raises(ValueError, match="masks"):
        pad_sample(bad, 3)


def test_collate_stacks_padded_samples():
    samples = [make_sample(n, g=g, seed=n) for n, g in ((2, 0), (0, 1), (3, 0))]
    batch = collate(samples)  # M defaults to 3, G to 1
    assert batch["boxes"].shape == (3, 3, 4) and batch["masks"].shape == (3, 3, 6, 5)
    assert batch["ignore_boxes"].shape == (3, 1, 4)
    np.testing.assert_array_equal(batch["num_instances"], [2, 0, 3])
    np.testing.assert_array_equal(batch["num_ignore"], [0, 1, 0])
    for b, sample in enumerate(samples):
        n = len(sample["boxes"])
        np.testing.assert_array_equal(batch["boxes"][b, :n], sample["boxes"])
        np.testing.assert_array_equal(batch["image"][b], sample["image"])
    assert collate(samples, 5, 2)["class_ids"].shape == (3, 5)
    with pytest.raises(ValueError, match="one size"):
        collate([make_sample(1), make_sample(1, h=7)])


# ---------------------------------------------------------------------------
# The tf.data pipeline
# ---------------------------------------------------------------------------


class FakeSource:
    """A tiny deterministic source: image pixel (0, 0, 0) holds the index; i % 4 instances;
    every third sample has a crowd box; ``sizes`` may give some indices another image size.
    ``delay`` makes later calls finish first, to test that the parallel map keeps order."""

    def __init__(self, n=10, h=6, w=5, sizes=None, delay=0.0):
        self.n, self.h, self.w, self.sizes, self.delay = n, h, w, sizes or {}, delay
        self.threads = set()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.threads.add(threading.get_ident())
        time.sleep(self.delay * ((self.n - i) % 3))
        h, w = self.sizes.get(i, (self.h, self.w))
        sample = make_sample(i % 4, h, w, g=int(i % 3 == 0), image_id=100 + i, seed=i)
        sample["image"][0, 0, 0] = i
        return sample


def batches(dataset, count):
    return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(count)]


def indices_of(batch):
    return batch["image"][:, 0, 0, 0].tolist()


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_make_dataset_has_static_shapes_and_dtypes():
    dataset = make_dataset(FakeSource(), 4, 3, max_ignore=2)
    spec = dataset.element_spec
    expected = {
        "image": ([4, 6, 5, 3], tf.uint8), "boxes": ([4, 3, 4], tf.float32),
        "class_ids": ([4, 3], tf.int32), "masks": ([4, 3, 6, 5], tf.bool),
        "num_instances": ([4], tf.int32), "ignore_boxes": ([4, 2, 4], tf.float32),
        "num_ignore": ([4], tf.int32),
    }
    assert set(spec) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert spec[key].shape.as_list() == shape and spec[key].dtype == dtype, key


def test_make_dataset_without_shuffle_equals_collate_of_the_source():
    source = FakeSource(n=10)
    got = batches(make_dataset(source, 4, 3, shuffle=False, repeat=False,
                               drop_remainder=False, max_ignore=1), 10)
    assert [len(b["image"]) for b in got] == [4, 4, 2]
    for b, start in zip(got, (0, 4, 8)):
        want = collate([source[i] for i in range(start, min(start + 4, 10))], 3, 1)
        assert_batches_equal(b, want)
    dropped = batches(make_dataset(source, 4, 3, shuffle=False, repeat=False), 10)
    assert len(dropped) == 2


def test_make_dataset_shuffles_each_epoch_reproducibly():
    source = FakeSource(n=8)
    run = batches(make_dataset(source, 4, 3, seed=1, max_ignore=1), 6)  # 3 epochs of 2 batches
    epochs = [sum((indices_of(b) for b in run[e:e + 2]), []) for e in (0, 2, 4)]
    for order in epochs:
        assert sorted(order) == list(range(8))  # every epoch is a permutation
    assert epochs[0] != list(range(8))  # shuffled
    assert len({tuple(o) for o in epochs}) > 1  # reshuffled between epochs
    for b in run:  # each element is the padded source sample it claims to be
        assert_batches_equal(b, collate([source[i] for i in indices_of(b)], 3, 1))
    again = batches(make_dataset(source, 4, 3, seed=1, max_ignore=1), 6)
    for a, b in zip(run, again):
        assert_batches_equal(a, b)
    other = batches(make_dataset(source, 4, 3, seed=2, max_ignore=1), 6)
    assert [indices_of(b) for b in other] != [indices_of(b) for b in run]


def test_make_dataset_parallel_map_keeps_order():
    source = FakeSource(n=12, delay=0.005)  # later indices of a group return first
    serial = batches(make_dataset(source, 3, 3, seed=4, num_parallel_calls=1), 8)
    parallel = batches(make_dataset(source, 3, 3, seed=4, num_parallel_calls=3), 8)
    assert len(source.threads) > 1  # the map really ran on several threads
    for a, b in zip(serial, parallel):
        assert_batches_equal(a, b)


def test_make_dataset_applies_the_transform_before_padding():
    def flip(sample):
        return {**sample, "image": sample["image"][:, ::-1].copy(),
                "masks": sample["masks"][:, :, ::-1].copy()}

    source = FakeSource(n=4)
    got = batches(make_dataset(source, 4, 3, shuffle=False, transform=flip), 1)[0]
    want = collate([flip(source[i]) for i in range(4)], 3, 8)
    assert_batches_equal(got, want)


def test_make_dataset_too_many_instances_names_the_sample_unless_truncating():
    source = FakeSource(n=8)  # sample 3 has 3 instances
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"source\[3\]: image id 103 has 3"):
        batches(make_dataset(source, 4, 2, shuffle=False), 2)
    got = batches(make_dataset(source, 4, 2, shuffle=False, truncate=True), 1)[0]
    np.testing.assert_array_equal(got["num_instances"], [0, 1, 2, 2])


def test_make_dataset_needs_one_image_size():
    source = FakeSource(n=6, sizes={4: (7, 5)})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"source\[4\].*7x5.*6x5"):
        batches(make_dataset(source, 2, 3, shuffle=False), 3)
    source.image_sizes = [[6, 5]] * 4 + [[7, 5], [6, 5]]  # known sizes: checked up front
    with pytest.raises(ValueError, match=r"source\[4\] is 7x5"):
        make_dataset(source, 2, 3)
    with pytest.raises(ValueError, match="at least one"):
        make_dataset(FakeSource(n=0), 2, 3)


def test_make_dataset_reads_a_coco_dataset(coco):
    json_path, image_dir, _ = coco
    source = CocoDataset(json_path, image_dir)
    got = batches(make_dataset(source, 3, 4, shuffle=False, max_ignore=2), 1)[0]
    assert_batches_equal(got, collate([source[i] for i in range(3)], 4, 2))
    np.testing.assert_array_equal(got["num_instances"], [3, 0, 1])
    np.testing.assert_array_equal(got["num_ignore"], [1, 0, 0])


# ---------------------------------------------------------------------------
# The synthetic scenes: the pipeline and the COCO round trip
# ---------------------------------------------------------------------------


def test_make_dataset_on_mnist_scenes():
    from synthetic_data import MnistDetection

    source = MnistDetection("train", 6, seed=3, image_size=64, max_digits=4)
    got = batches(make_dataset(source, 3, 4, seed=0, max_ignore=1), 2)
    for b in got:
        assert b["image"].shape == (3, 64, 64, 3)
        # recover which scenes the batch holds by their images, then compare everything
        order = [next(i for i in range(6) if np.array_equal(source[i]["image"], image))
                 for image in b["image"]]
        assert_batches_equal(b, collate([source[i] for i in order], 4, 1))


def test_coco_round_trip_of_the_synthetic_export(tmp_path):
    """export_coco -> CocoDataset gives back the generator's images, boxes, classes and masks;
    and the COCO bbox field equals the tight box of the mask (the box CocoDataset returns)."""
    from synthetic_data import MnistDetection
    from synthetic_data.export import export_coco

    scene_kwargs = dict(image_size=48, max_digits=5, digit_size=(10, 24))
    paths = export_coco(tmp_path, counts={"val": 5}, seed=7, **scene_kwargs)
    dataset = CocoDataset(paths["val"], tmp_path / "val")
    scenes = MnistDetection("val", 5, seed=7, **scene_kwargs)
    assert len(dataset) == len(scenes) == 5
    assert dataset.category_names == scenes.category_names
    bbox_fields = {}
    for ann in json.loads(paths["val"].read_text())["annotations"]:
        bbox_fields.setdefault(ann["image_id"], []).append(ann["bbox"])
    total = 0
    for i in range(5):
        got, want = dataset[i], scenes[i]
        n = len(want["boxes"])
        total += n
        assert got["image_id"] == want["image_id"]
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        np.testing.assert_array_equal(got["class_ids"], want["class_ids"])
        np.testing.assert_array_equal(got["masks"], want["masks"])
        assert got["ignore_boxes"].shape == (0, 4)
        xywh = np.reshape(bbox_fields.get(want["image_id"], []), (-1, 4))
        np.testing.assert_array_equal(xywh[:, [1, 0]], got["boxes"][:, :2])  # y, x
        np.testing.assert_array_equal(xywh[:, [1, 0]] + xywh[:, [3, 2]], got["boxes"][:, 2:])
    assert total > 0  # the test compared some objects
