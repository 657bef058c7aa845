"""Tests of minimask.data.CocoDataset on broken COCO files: every problem raises
CocoFormatError (a ValueError) whose message names the file, and the annotation id where
there is one; nothing is skipped silently.  Each test breaks one thing in a valid file."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from minimask.data import BOUNDS_TOLERANCE, CocoDataset, CocoFormatError

H, W = 10, 12


def valid_coco():
    """A valid COCO dict: two images, categories 1 and 4, annotation ids 21 and 22."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}],
        "annotations": [
            {"id": 21, "image_id": 1, "category_id": 4, "iscrowd": 0, "bbox": [2, 1, 4, 3],
             "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 22, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2],
             "segmentation": {"size": [H, W], "counts": [0, 2, H - 2, 2, H * W - H - 2]}},
        ],
    }


@pytest.fixture
def write(tmp_path):
    """write(coco dict) -> (json path, image dir), with the images of valid_coco on disk."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(image_dir / name)

    def write_file(coco):
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(coco))
        return path, image_dir

    return write_file


def raises_naming(path, *parts):
    """pytest.raises for a CocoFormatError whose message contains the path and every part."""
    pattern = "".join(f"(?=.*{re.escape(str(p))})" for p in (path, *parts))
    return pytest.raises(CocoFormatError, match=re.compile(pattern, re.DOTALL))


def annotation(coco, ann_id):
    return next(a for a in coco["annotations"] if a["id"] == ann_id)


def test_the_valid_file_reads(write):
    dataset = CocoDataset(*write(valid_coco()))
    dataset.validate()
    assert [len(dataset[i]["boxes"]) for i in range(2)] == [1, 1]
    assert issubclass(CocoFormatError, ValueError)


# --- the file itself ----------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.json"
    with raises_naming(path, "cannot read"):
        CocoDataset(path, tmp_path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with raises_naming(path, "malformed JSON", "line 3") as info:
        CocoDataset(path, tmp_path)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(write, key):
    coco = valid_coco()
    del coco[key]
    path, image_dir = write(coco)
    with raises_naming(path, "missing top-level key", key):
        CocoDataset(path, image_dir)


def test_top_level_not_an_object(write):
    path, image_dir = write([1, 2])
    with raises_naming(path, "top level"):
        CocoDataset(path, image_dir)


# --- images and categories ---------------------------------------------------------


def test_duplicate_ids(write):
    for key, problem in (("images", "image id 1 appears twice"),
                         ("categories", "category id 1 appears twice"),
                         ("annotations", "annotation id 21: this annotation id appears twice")):
        coco = valid_coco()
        coco[key].append(dict(coco[key][0]))
        path, image_dir = write(coco)
        with raises_naming(path, problem):
            CocoDataset(path, image_dir)


def test_image_entry_with_bad_size(write):
    coco = valid_coco()
    coco["images"][1]["height"] = 0
    path, image_dir = write(coco)
    with raises_naming(path, "image id 2", "positive integers"):
        CocoDataset(path, image_dir)


def test_missing_image_file(write):
    coco = valid_coco()
    coco["images"][1]["file_name"] = "lost.png"
    path, image_dir = write(coco)
    with raises_naming(path, image_dir / "lost.png", "does not exist"):
        CocoDataset(path, image_dir)


def test_image_of_the_wrong_size(write):
    path, image_dir = write(valid_coco())
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(image_dir / "b.png")
    dataset = CocoDataset(path, image_dir)  # header not read by default
    dataset[0]
    message = [image_dir / "b.png", f"{H + 1}x{W}", f"{H}x{W}", "image id 2"]
    with raises_naming(path, *message):
        dataset[1]
    with raises_naming(path, *message):
        dataset.validate()
    with raises_naming(path, *message):
        CocoDataset(path, image_dir, validate_images=True)


def test_unreadable_image(write):
    path, image_dir = write(valid_coco())
    (image_dir / "a.png").write_bytes(b"not a png")
    with raises_naming(image_dir / "a.png", "cannot read the image"):
        CocoDataset(path, image_dir)[0]


# --- annotations: references and keys ------------------------------------------------


def test_unknown_image_id(write):
    coco = valid_coco()
    annotation(coco, 22)["image_id"] = 7
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "unknown image id 7"):
        CocoDataset(path, image_dir)


def test_unknown_category_id(write):
    coco = valid_coco()
    annotation(coco, 21)["category_id"] = 2
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", "unknown category id 2"):
        CocoDataset(path, image_dir)


@pytest.mark.parametrize("key", ["image_id", "category_id", "bbox", "segmentation"])
def test_annotation_missing_a_key(write, key):
    coco = valid_coco()
    del annotation(coco, 22)[key]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "missing key", key):
        CocoDataset(path, image_dir)


def test_bad_iscrowd(write):
    coco = valid_coco()
    annotation(coco, 21)["iscrowd"] = 2
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", "iscrowd"):
        CocoDataset(path, image_dir)


# --- annotations: boxes ---------------------------------------------------------------


@pytest.mark.parametrize("bbox", [
    [W - 3, 1, 4 + BOUNDS_TOLERANCE, 3],  # right edge past the image by more than the tolerance
    [2, -1.5, 4, 3],  # above the image
    [2, 1.5, 4, H],  # bottom edge past the image
])
def test_bbox_outside_the_image(write, bbox):
    coco = valid_coco()
    annotation(coco, 21)["bbox"] = bbox
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", "outside its image"):
        CocoDataset(path, image_dir)


def test_bbox_within_the_tolerance_is_accepted(write):
    coco = valid_coco()
    annotation(coco, 21)["bbox"] = [-BOUNDS_TOLERANCE, 1, W + 2 * BOUNDS_TOLERANCE, 3]
    CocoDataset(*write(coco))


@pytest.mark.parametrize("bbox", [[2, 1, 0, 3], [2, 1, 4, -1]])
def test_bbox_with_non_positive_size(write, bbox):
    coco = valid_coco()
    annotation(coco, 21)["bbox"] = bbox
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", "non-positive width or height"):
        CocoDataset(path, image_dir)


def test_bbox_not_four_numbers(write):
    coco = valid_coco()
    annotation(coco, 22)["bbox"] = [1, 2, 3]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "4 finite numbers"):
        CocoDataset(path, image_dir)


# --- annotations: segmentations --------------------------------------------------------


@pytest.mark.parametrize("polygon, problem", [
    ([2, 1, 6, 1], "at least 3"),  # two points
    ([2, 1, 6, 1, 6], "at least 3"),  # odd number of coordinates
    ([2, 1, W + 2, 1, 6, 4], "outside the image"),  # x past the width
    ([2, -3, 6, 1, 6, 4], "outside the image"),  # y above the image
    ([2, 1, "6", 1, 6, 4], "list of numbers"),
])
def test_bad_polygon(write, polygon, problem):
    coco = valid_coco()
    annotation(coco, 21)["segmentation"] = [[2, 1, 6, 1, 6, 4, 2, 4], polygon]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", problem):
        CocoDataset(path, image_dir)


def test_empty_polygon_list(write):
    coco = valid_coco()
    annotation(coco, 21)["segmentation"] = []
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 21", "empty list"):
        CocoDataset(path, image_dir)


def test_degenerate_mask_is_found_when_decoding(write):
    coco = valid_coco()
    annotation(coco, 21)["segmentation"] = [[2, 1, 3, 2, 4, 3]]  # three points on a line
    path, image_dir = write(coco)
    dataset = CocoDataset(path, image_dir)  # the JSON alone looks fine
    with raises_naming(path, "annotation id 21", "empty mask"):
        dataset[0]
    with raises_naming(path, "annotation id 21", "empty mask"):
        dataset.validate()


def test_degenerate_crowd_region_is_not_an_error(write):
    coco = valid_coco()
    ann = annotation(coco, 21)
    ann["iscrowd"] = 1
    ann["segmentation"] = [[2, 1, 3, 2, 4, 3]]  # crowds are never decoded: only their bbox is used
    sample = CocoDataset(*write(coco))[0]
    assert len(sample["boxes"]) == 0
    np.testing.assert_array_equal(sample["ignore_boxes"], [[1, 2, 4, 6]])


def test_rle_of_the_wrong_size(write):
    coco = valid_coco()
    annotation(coco, 22)["segmentation"]["size"] = [W, H]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "RLE size", f"[{H}, {W}]"):
        CocoDataset(path, image_dir)


def test_rle_counts_not_covering_the_image(write):
    coco = valid_coco()
    annotation(coco, 22)["segmentation"]["counts"] = [0, 2, H - 2, 2]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", f"add up to {H + 2} pixels", H * W):
        CocoDataset(path, image_dir)


def test_rle_with_negative_counts(write):
    coco = valid_coco()
    annotation(coco, 22)["segmentation"]["counts"] = [-2, H * W + 2]
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "non-negative"):
        CocoDataset(path, image_dir)


@pytest.mark.parametrize("counts, problem", [
    ("<0<", "add up to"),  # runs 12, 0, 12: valid characters, wrong total (pycocotools
    # would decode a garbage mask without complaint)
    ("zzzz", "not an RLE character"),
    ("abc", "ends in the middle"),  # the last character says "more follows"
    ("ab c", "not an RLE character"),
    ("<0J", "non-negative"),  # runs 12, 0, then -6
])
def test_bad_compressed_rle(write, counts, problem):
    coco = valid_coco()
    annotation(coco, 22)["segmentation"]["counts"] = counts
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", problem):
        CocoDataset(path, image_dir)


def test_segmentation_of_the_wrong_type(write):
    coco = valid_coco()
    annotation(coco, 22)["segmentation"] = "polygon"
    path, image_dir = write(coco)
    with raises_naming(path, "annotation id 22", "list of polygons or an RLE dict"):
        CocoDataset(path, image_dir)
