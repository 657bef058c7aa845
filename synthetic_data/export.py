"""Write MNIST-detection scenes to disk in COCO format (the format Mask R-CNN reads).

COCO ("Common Objects in Context", Lin et al. 2014) stores one JSON file per split:

* ``images``: ``{"id", "file_name", "height", "width"}``, one per picture;
* ``annotations``: one per object instance, ``{"id", "image_id", "category_id",
  "segmentation", "area", "bbox", "iscrowd"}``; here ``segmentation`` is a run-length
  encoding (RLE) of the instance mask made by ``pycocotools.mask.encode``, ``area``
  its pixel count, and ``bbox`` the tight box of the mask as ``[x, y, w, h]``
  (converted with :func:`minimask.boxes.yxyx_to_coco_xywh`);
* ``categories``: ``{"id", "name", "supercategory"}``, ids 1..10 named "0".."9".

Layout written by :func:`export_coco`::

    out_dir/train.json   out_dir/train/000001.png ...
    out_dir/val.json     out_dir/val/000001.png ...
    out_dir/test.json    out_dir/test/000001.png ...

Each ``file_name`` is relative to that split's image folder ``out_dir/{split}/``.
Annotations also carry ``digit_index`` (which MNIST image the instance is; extra keys
are ignored by COCO tools).  The export is deterministic: the same arguments give
byte-identical files (sorted JSON keys, no dates, fixed PNG settings).
"""
import json
from pathlib import Path

from PIL import Image

from minimask import data
from synthetic_data.mnist import SPLITS
from synthetic_data.scenes import CATEGORY_NAMES, MnistDetection

DEFAULT_COUNTS = {"train": 200, "val": 50, "test": 50}
# Fixed so that two exports write the same bytes.  Level 1: the background noise does not
# compress, so higher levels save ~10% of space for ~60% more time.
PNG_COMPRESS_LEVEL = 1


def coco_categories():
    """The COCO ``categories`` list: ids 1..10 named "0".."9" (class id = digit + 1)."""
    return data.coco_categories(CATEGORY_NAMES, supercategory="digit")


def sample_to_coco(sample, file_name, first_annotation_id):
    """One scene -> (COCO image dict, annotation dicts), each annotation with its ``digit_index``."""
    return data.sample_to_coco(sample, file_name, first_annotation_id,
                               extra={"digit_index": sample["digit_index"]})


def export_split(dataset, out_dir):
    """Write ``dataset`` (a :class:`MnistDetection`) as ``out_dir/{split}.json`` + PNGs -> json path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / dataset.split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        file_name = f"{sample['image_id']:06d}.png"
        Image.fromarray(sample["image"]).save(
            image_dir / file_name, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        # COCO annotation ids start at 1 (COCOeval treats id 0 as "unmatched").
        image, image_annotations = sample_to_coco(sample, file_name, len(annotations) + 1)
        images.append(image)
        annotations.extend(image_annotations)
    coco = {
        "info": {
            "description": "minimask synthetic MNIST-detection scenes "
                           "(file_name is relative to the folder named after the split)",
            "split": dataset.split,
            "generator": dataset.config(),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    json_path = out_dir / f"{dataset.split}.json"
    json_path.write_text(json.dumps(coco, sort_keys=True) + "\n", encoding="utf-8")
    return json_path


def export_coco(out_dir, counts=None, seed=0, **scene_kwargs):
    """Export scenes as COCO: ``counts`` {split: number of scenes} -> {split: path of its JSON}.

    Writes ``out_dir/{split}.json`` and the images ``out_dir/{split}/NNNNNN.png``; each
    image's ``file_name`` is relative to ``out_dir/{split}/``.  ``scene_kwargs`` go to
    :class:`MnistDetection` (image_size, max_digits, ...).  Splits with count 0 are skipped.
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in counts: expected {SPLITS}")
    negative = {split: n for split, n in counts.items() if int(n) < 0}
    if negative:
        raise ValueError(f"scene counts must be >= 0, got {negative}")
    paths = {}
    for split in SPLITS:
        if counts.get(split, 0) > 0:
            dataset = MnistDetection(split, counts[split], seed, **scene_kwargs)
            paths[split] = export_split(dataset, out_dir)
    return paths
