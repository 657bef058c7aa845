"""Tests of synthetic_data.export: the COCO files, read back with pycocotools."""
import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minimask.boxes import boxes_from_masks, yxyx_to_coco_xywh
from synthetic_data import MnistDetection, export_coco, split_pools
from synthetic_data.__main__ import main

COUNTS = {"train": 200, "val": 0, "test": 50}
SEED = 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exports with the same arguments, in two folders."""
    first = tmp_path_factory.mktemp("first")
    second = tmp_path_factory.mktemp("second")
    paths = export_coco(first, counts=COUNTS, seed=SEED)
    export_coco(second, counts=COUNTS, seed=SEED)
    return first, second, paths


def load_coco(json_path):
    """pycocotools.COCO of ``json_path`` -> (COCO, captured stdout, recorded warnings)."""
    stdout = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        coco = COCO(str(json_path))
    return coco, stdout.getvalue(), caught


def all_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_export_writes_the_documented_layout(exported):
    folder, _, paths = exported
    assert set(paths) == {"train", "test"}  # the split with count 0 is skipped
    for split, count in [("train", 200), ("test", 50)]:
        assert paths[split] == folder / f"{split}.json"
        data = json.loads(paths[split].read_text())
        assert len(data["images"]) == count
        for image in data["images"]:
            assert (folder / split / image["file_name"]).is_file()  # relative to DIR/{split}/
            assert (image["height"], image["width"]) == (128, 128)
        assert data["categories"] == [
            {"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)
        ]
        ids = [a["id"] for a in data["annotations"]]
        assert len(set(ids)) == len(ids) and min(ids) >= 1
        assert all(a["iscrowd"] == 0 for a in data["annotations"])


def test_pycocotools_loads_without_warnings(exported):
    _, _, paths = exported
    for path in paths.values():
        coco, stdout, caught = load_coco(path)
        assert caught == []
        assert "warn" not in stdout.lower() and "error" not in stdout.lower()
        assert len(coco.getImgIds()) > 0 and coco.getCatIds() == list(range(1, 11))


def test_bbox_and_area_agree_with_the_decoded_rle(exported):
    _, _, paths = exported
    coco, _, _ = load_coco(paths["train"])
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) > 200
    for ann in annotations:
        rle = ann["segmentation"]
        mask = coco.annToMask(ann).astype(bool)  # [H, W]
        np.testing.assert_array_equal(ann["bbox"], mask_utils.toBbox(rle))
        np.testing.assert_array_equal(ann["bbox"], yxyx_to_coco_xywh(boxes_from_masks(mask[None]))[0])
        assert ann["area"] == mask.sum() == mask_utils.area(rle)
        assert isinstance(ann["area"], int) and mask.sum() > 0


def test_exports_with_the_same_seed_are_byte_identical(exported):
    first, second, _ = exported
    files_a, files_b = all_files(first), all_files(second)
    assert files_a.keys() == files_b.keys() and len(files_a) == 2 + 250
    for name in files_a:
        assert files_a[name] == files_b[name], name


def test_train_and_test_use_disjoint_digit_pools(exported):
    _, _, paths = exported
    used = {}
    for split, path in paths.items():
        data = json.loads(path.read_text())
        used[split] = {a["digit_index"] for a in data["annotations"]}
        assert used[split] <= set(split_pools(8000)[split].tolist())
    assert used["train"] and used["test"] and not used["train"] & used["test"]


def test_exported_scenes_equal_the_generator_samples(exported):
    folder, _, paths = exported
    for split, count in [("train", 200), ("test", 50)]:
        dataset = MnistDetection(split, num_scenes=count, seed=SEED)
        coco, _, _ = load_coco(paths[split])
        empty_images = 0
        for index in range(count):
            sample = dataset[index]
            info = coco.loadImgs(sample["image_id"])[0]
            pixels = np.asarray(Image.open(folder / split / info["file_name"]))
            np.testing.assert_array_equal(pixels, sample["image"])
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=sample["image_id"])), key=lambda a: a["id"])
            empty_images += len(anns) == 0
            assert len(anns) == len(sample["class_ids"])
            for ann, box, class_id, mask in zip(anns, sample["boxes"], sample["class_ids"], sample["masks"]):
                np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
                np.testing.assert_array_equal(ann["bbox"], yxyx_to_coco_xywh(box))
                assert ann["category_id"] == class_id
        if split == "train":
            assert empty_images > 0  # empty scenes are images with no annotations


def test_cli_writes_the_same_files_as_export_coco(tmp_path):
    arguments = ["--train", "3", "--val", "2", "--test", "0", "--seed", "4", "--image-size", "64",
                 "--digit-size", "14", "32", "--max-digits", "3"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--out", str(tmp_path / "cli"), *arguments]) == 0
    export_coco(tmp_path / "api", counts={"train": 3, "val": 2, "test": 0}, seed=4, image_size=64,
                digit_size=(14, 32), max_digits=3)
    assert all_files(tmp_path / "cli") == all_files(tmp_path / "api")
    assert len(all_files(tmp_path / "api")) == 2 + 5


def test_cli_help_documents_the_layout():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "relative to DIR/{split}/" in stdout.getvalue()


def test_unknown_split_in_counts_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        export_coco(tmp_path, counts={"training": 3})
