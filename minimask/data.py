"""Data: read COCO instance-segmentation files, and feed samples to a model with tf.data.

Mask R-CNN learns from images annotated with one box, one class and one mask per
object (He et al. 2017, Sec. 3.1, "Training": an RoI's mask target is the
intersection between the RoI and its ground-truth mask).  This module brings such
annotations into the conventions of :mod:`minimask.boxes` and batches them.

The two halves:

1. :class:`CocoDataset` reads any COCO instance-segmentation file (Lin et al. 2014,
   "Microsoft COCO: Common Objects in Context"; the format is documented at
   cocodataset.org, "Data format") into samples::

       {"image": uint8 [H, W, 3], "boxes": float32 [N, 4] (y1, x1, y2, x2),
        "class_ids": int32 [N], "masks": bool [N, H, W],
        "ignore_boxes": float32 [G, 4], "image_id": int}

   Masks are decoded with pycocotools; a malformed file raises :class:`CocoFormatError`
   naming the file and the annotation, never skipping anything silently.

2. :func:`make_dataset` turns *any* source of samples (an object with ``len(source)``
   and ``source[i] -> sample``: a :class:`CocoDataset`, or the synthetic
   ``synthetic_data.MnistDetection``) into a ``tf.data.Dataset`` of padded batches
   with static shapes, the form every model stage expects (see "A batch" in
   :mod:`minimask.boxes`).  :func:`pad_sample` and :func:`collate` are the numpy
   building blocks, handy on their own in lessons and tests.
"""
import json
import math
import operator
import os

import numpy as np
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils

from minimask.boxes import boxes_from_masks, coco_xywh_to_yxyx, yxyx_to_coco_xywh

# A COCO box or polygon may stick out of its image by this many pixels before it is
# an error: annotation tools round coordinates, and the official COCO files contain
# boxes ending at width + 0.5 or so.
BOUNDS_TOLERANCE = 1.0

# The three top-level lists every COCO instance file has ("info" and "licenses" are optional).
REQUIRED_KEYS = ("images", "annotations", "categories")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_CATEGORY_KEYS = ("id", "name")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")


class CocoFormatError(ValueError):
    """A COCO file (or one of its images) that breaks the format; the message names the file."""


# ---------------------------------------------------------------------------
# Writing COCO (used by the synthetic export and by evaluation)
# ---------------------------------------------------------------------------


def encode_mask(mask):
    """bool ``[H, W]`` mask -> COCO RLE dict ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))  # column-major uint8
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def sample_to_coco(sample, file_name, first_annotation_id, extra=None):
    """One sample -> (COCO image dict, list of COCO annotation dicts with ids from ``first_annotation_id``).

    ``bbox`` is the sample's box as ``[x, y, w, h]``, ``area`` the mask's pixel count,
    ``segmentation`` its RLE, ``iscrowd`` 0.  ``extra`` maps a field name to a per-instance
    array whose values are added to the annotations (COCO tools ignore unknown fields).
    """
    height, width = sample["image"].shape[:2]
    image = {"id": int(sample["image_id"]), "file_name": file_name, "height": int(height),
             "width": int(width)}
    xywh = yxyx_to_coco_xywh(sample["boxes"]).reshape(-1, 4)  # [N, 4] (x, y, w, h)
    annotations = []
    for k, mask in enumerate(sample["masks"]):
        annotation = {
            "id": first_annotation_id + k,
            "image_id": image["id"],
            "category_id": int(sample["class_ids"][k]),
            "segmentation": encode_mask(mask),
            "area": int(mask.sum()),
            "bbox": [float(v) for v in xywh[k]],
            "iscrowd": 0,
        }
        for key, values in (extra or {}).items():
            annotation[key] = int(values[k])
        annotations.append(annotation)
    return image, annotations


def coco_categories(category_names, supercategory="object"):
    """``["background", name1, ...]`` -> COCO categories with ids 1..K."""
    return [{"id": k, "name": str(name), "supercategory": supercategory}
            for k, name in enumerate(category_names) if k > 0]


# ---------------------------------------------------------------------------
# Reading COCO files
# ---------------------------------------------------------------------------


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _load_json(path):
    """The parsed JSON of ``path``; unreadable or malformed files raise CocoFormatError."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{path}: cannot read the file ({err})") from err


def rle_string_to_counts(string):
    """A compressed COCO RLE string -> its list of run lengths (the uncompressed ``counts``).

    The format pycocotools writes (``rleToString`` in its maskApi.c): each run length is
    stored as 5-bit groups, least significant first, one character per group
    (``chr(48 + group)``, with bit 0x20 set while more groups follow and bit 0x10 of
    the last group the sign); from the fourth run on, the number stored is the
    difference to the run two places earlier.  Raises ValueError on a malformed string.
    """
    counts, value, shift = [], 0, 0
    for position, char in enumerate(string):
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise ValueError(f"character {char!r} at position {position} is not an RLE character")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:  # more groups of this number follow
            continue
        if code & 0x10:  # negative: sign-extend
            value -= 1 << shift
        if len(counts) > 2:  # runs 3, 4, ... (0-based) are stored as differences
            value += counts[-2]
        counts.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("the string ends in the middle of a number")
    return counts


def decode_segmentation(segmentation, height, width):
    """A COCO ``segmentation`` (polygons, RLE or compressed RLE) -> bool mask ``[height, width]``.

    * polygons: a list of ``[x0, y0, x1, y1, ...]`` lists in continuous pixel
      coordinates; their union is the mask (rasterized by pycocotools: roughly, a pixel
      is in when its centre is inside);
    * uncompressed RLE: ``{"size": [h, w], "counts": [int, ...]}`` (column-major runs,
      starting with a run of zeros);
    * compressed RLE: ``{"size": [h, w], "counts": "<string>"}`` (the LEB128-like string
      pycocotools writes).

    This does no validation: :class:`CocoDataset` checks the structure first.
    """
    if isinstance(segmentation, list):
        # frPyObjects turns each polygon into an RLE; merge takes their union.
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]),
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


class CocoDataset:
    """A COCO instance-segmentation file as a sequence of minimask samples.

    ``dataset[i]`` -> ``{"image": uint8 [H, W, 3], "boxes": float32 [N, 4] (y1, x1, y2, x2),
    "class_ids": int32 [N], "masks": bool [N, H, W], "ignore_boxes": float32 [G, 4],
    "image_id": int}`` for the i-th entry of the file's ``"images"`` list.

    Classes
        COCO category ids (e.g. 1..90 with gaps) become contiguous class ids ``1..K``,
        sorted by COCO id; 0 is background.  ``category_names[k]`` names class ``k``
        (``category_names[0] == "background"``) and ``coco_category_ids[k]`` is its
        COCO id (``coco_category_ids[0]`` is None), to map predictions back for COCO
        evaluation.
    Objects and crowds
        An annotation with ``iscrowd=1`` marks a region of many objects (a crowd of
        people) that is neither an object nor background: it is not an instance, and
        its COCO ``bbox`` goes to ``"ignore_boxes"`` (every sample has that key; G may
        be 0).  A missing ``iscrowd`` field counts as 0.
    Boxes
        An object's box is the tight box of its decoded mask
        (:func:`minimask.boxes.boxes_from_masks`), not the COCO ``bbox`` field, so that
        box and mask always agree exactly (the ``bbox`` field is still validated
        against the image bounds).  For the synthetic MNIST export the two are equal,
        and ``tests/test_data.py`` checks it; on real COCO they differ by a fraction of
        a pixel, since COCO boxes were computed from the polygons, not from the pixels.
    Images
        Read with PIL and converted to RGB uint8 (grayscale is repeated over three
        channels; an alpha channel is dropped).  An image with no annotations gives
        ``N = 0``: boxes ``[0, 4]``, class ids ``[0]``, masks ``[0, H, W]``.

    Validation (errors are :class:`CocoFormatError` naming the file and, where there is
    one, the annotation id; nothing is skipped):

    * at construction, from the JSON alone: unreadable file or malformed JSON; missing
      top-level keys; malformed images, categories or annotations (missing keys,
      duplicate ids); an annotation whose image id or category id is unknown; a
      ``bbox`` with non-positive width/height or outside its image (beyond
      ``BOUNDS_TOLERANCE`` pixels); a polygon with fewer than 3 points or with points
      outside the image; an RLE whose size is not the image's, or whose counts
      (compressed strings are read by :func:`rle_string_to_counts`) are malformed or
      do not add up to ``height * width``; and a missing image file (``os.path.exists``).
    * at construction only with ``validate_images=True`` (opens every image header;
      slower on a large set), else when the image is read in ``dataset[i]``: an image
      file whose real size differs from the JSON ``height``/``width``, or that PIL
      cannot read.
    * in ``dataset[i]``, which decodes the masks: an empty mask of a non-crowd
      annotation (e.g. a polygon of three points on a line; crowd masks are never
      decoded).  :meth:`validate` walks the whole set and raises on the first problem.
    """

    def __init__(self, json_path, image_dir, *, validate_images=False):
        self.json_path = os.fspath(json_path)
        self.image_dir = os.fspath(image_dir)
        data = _load_json(self.json_path)
        if not isinstance(data, dict):
            raise self._error(f"the top level is a {type(data).__name__}, not an object")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise self._error(f"missing top-level key(s) {missing}; a COCO instance file "
                              f"needs {list(REQUIRED_KEYS)}")
        for key in REQUIRED_KEYS:
            if not isinstance(data[key], list):
                raise self._error(f'"{key}" must be a list, not a {type(data[key]).__name__}')

        self._read_categories(data["categories"])
        self._read_images(data["images"])
        self._read_annotations(data["annotations"])
        self._check_image_files_exist()
        if validate_images:
            for info in self._images:
                self._image_path_checked(info)

    # --- construction steps -------------------------------------------------

    def _error(self, problem, annotation_id=None):
        where = "" if annotation_id is None else f"annotation id {annotation_id}: "
        return CocoFormatError(f"{self.json_path}: {where}{problem}")

    def _read_categories(self, categories):
        by_id = {}
        for cat in categories:
            if not isinstance(cat, dict) or any(k not in cat for k in _CATEGORY_KEYS):
                raise self._error(f"a category needs the keys {list(_CATEGORY_KEYS)}: {cat!r:.200}")
            if not _is_int(cat["id"]):
                raise self._error(f"category id {cat['id']!r} is not an integer")
            if cat["id"] in by_id:
                raise self._error(f"category id {cat['id']} appears twice")
            by_id[cat["id"]] = str(cat["name"])
        ids = sorted(by_id)
        self.coco_category_ids = [None] + ids
        self.category_names = ["background"] + [by_id[i] for i in ids]
        self.num_classes = len(ids)
        self._class_of_category = {coco_id: k + 1 for k, coco_id in enumerate(ids)}

    def _read_images(self, images):
        self._images = []
        index_of = {}
        for info in images:
            if not isinstance(info, dict) or any(k not in info for k in _IMAGE_KEYS):
                raise self._error(f"an image needs the keys {list(_IMAGE_KEYS)}: {info!r:.200}")
            image_id = info["id"]
            if not _is_int(image_id):
                raise self._error(f"image id {image_id!r} is not an integer")
            if image_id in index_of:
                raise self._error(f"image id {image_id} appears twice")
            h, w = info["height"], info["width"]
            if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                raise self._error(f"image id {image_id}: height {h!r} and width {w!r} "
                                  "must be positive integers")
            index_of[image_id] = len(self._images)
            self._images.append(info)
        self._index_of_image = index_of
        self.image_ids = [info["id"] for info in self._images]
        # [num_images, 2] (height, width) from the JSON: lets make_dataset check sizes
        # without reading a single image.
        self.image_sizes = np.array([[i["height"], i["width"]] for i in self._images],
                                    np.int64).reshape(-1, 2)

    def _read_annotations(self, annotations):
        """Structure checks per annotation, then the box bounds for all at once."""
        self._annotations_of = [[] for _ in self._images]  # per image, in file order
        seen = set()
        bboxes, sizes, ann_ids = [], [], []
        for ann in annotations:
            if not isinstance(ann, dict):
                raise self._error(f"an annotation must be an object: {ann!r:.200}")
            ann_id = ann.get("id")
            missing = [k for k in _ANNOTATION_KEYS if k not in ann]
            if missing:
                raise self._error(f"missing key(s) {missing}", ann_id)
            if not _is_int(ann_id):
                raise self._error(f"annotation id {ann_id!r} is not an integer")
            if ann_id in seen:
                raise self._error("this annotation id appears twice", ann_id)
            seen.add(ann_id)
            if not _is_int(ann["image_id"]) or ann["image_id"] not in self._index_of_image:
                raise self._error(f"unknown image id {ann['image_id']!r} "
                                  "(not in the \"images\" list)", ann_id)
            if not _is_int(ann["category_id"]) or ann["category_id"] not in self._class_of_category:
                raise self._error(f"unknown category id {ann['category_id']!r} "
                                  "(not in the \"categories\" list)", ann_id)
            if ann.get("iscrowd", 0) not in (0, 1):
                raise self._error(f"iscrowd must be 0 or 1, not {ann['iscrowd']!r}", ann_id)
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
                raise self._error(f"bbox must be 4 finite numbers [x, y, w, h], not {bbox!r:.100}",
                                  ann_id)
            index = self._index_of_image[ann["image_id"]]
            h, w = self.image_sizes[index]
            self._check_segmentation(ann["segmentation"], int(h), int(w), ann_id)
            self._annotations_of[index].append(ann)
            bboxes.append(bbox)
            sizes.append((h, w))
            ann_ids.append(ann_id)
        self._check_bboxes(np.array(bboxes, np.float64).reshape(-1, 4),
                           np.array(sizes, np.float64).reshape(-1, 2), ann_ids)

    def _check_bboxes(self, xywh, sizes, ann_ids):
        """COCO boxes ``[A, 4]`` (x, y, w, h) against image sizes ``[A, 2]`` (h, w), vectorized."""
        x, y, w, h = xywh.T
        heights, widths = sizes.T
        empty = (w <= 0) | (h <= 0)
        outside = ((x < -BOUNDS_TOLERANCE) | (y < -BOUNDS_TOLERANCE)
                   | (x + w > widths + BOUNDS_TOLERANCE) | (y + h > heights + BOUNDS_TOLERANCE))
        for bad, problem in ((empty, "has a non-positive width or height"),
                             (outside, "lies outside its image")):
            if bad.any():
                i = int(np.argmax(bad))
                raise self._error(
                    f"bbox [x, y, w, h] = {xywh[i].tolist()} {problem} "
                    f"(image height {heights[i]:g}, width {widths[i]:g})", ann_ids[i])

    def _check_segmentation(self, seg, height, width, ann_id):
        if isinstance(seg, list):
            if not seg:
                raise self._error("segmentation is an empty list of polygons", ann_id)
            for polygon in seg:
                self._check_polygon(polygon, height, width, ann_id)
        elif isinstance(seg, dict):
            self._check_rle(seg, height, width, ann_id)
        else:
            raise self._error("segmentation must be a list of polygons or an RLE dict, "
                              f"not a {type(seg).__name__}", ann_id)

    def _check_polygon(self, polygon, height, width, ann_id):
        if not (isinstance(polygon, list) and all(map(_is_number, polygon))):
            raise self._error("a polygon must be a list of numbers [x0, y0, x1, y1, ...]", ann_id)
        if len(polygon) % 2 or len(polygon) < 6:
            raise self._error(f"a polygon needs at least 3 (x, y) points, this one has "
                              f"{len(polygon)} numbers", ann_id)
        points = np.array(polygon, np.float64).reshape(-1, 2)  # [2P] -> [P, 2] (x, y)
        low, high = points.min(axis=0), points.max(axis=0)  # [2] (x, y) each
        limit = np.array([width, height]) + BOUNDS_TOLERANCE
        if (low < -BOUNDS_TOLERANCE).any() or (high > limit).any():
            raise self._error(f"polygon points outside the image (x in [{low[0]:g}, {high[0]:g}], "
                              f"y in [{low[1]:g}, {high[1]:g}]; image height {height}, "
                              f"width {width})", ann_id)

    def _check_rle(self, rle, height, width, ann_id):
        if "size" not in rle or "counts" not in rle:
            raise self._error('an RLE segmentation needs "size" and "counts"', ann_id)
        if list(rle["size"]) != [height, width]:
            raise self._error(f"RLE size {rle['size']!r} is not the image's [height, width] = "
                              f"[{height}, {width}]", ann_id)
        counts = rle["counts"]
        if isinstance(counts, str):
            # pycocotools decodes a corrupt string into garbage without a word: read it here.
            try:
                counts = rle_string_to_counts(counts)
            except ValueError as err:
                raise self._error(f"cannot read the compressed RLE counts ({err})", ann_id) from err
        elif not (isinstance(counts, list) and all(_is_int(c) for c in counts)):
            raise self._error("RLE counts must be a list of integers or a string", ann_id)
        if any(c < 0 for c in counts):
            raise self._error("RLE counts must be non-negative", ann_id)
        if sum(counts) != height * width:
            raise self._error(f"RLE counts add up to {sum(counts)} pixels, not "
                              f"height * width = {height * width}", ann_id)

    def _check_image_files_exist(self):
        missing = [info["file_name"] for info in self._images
                   if not os.path.exists(os.path.join(self.image_dir, info["file_name"]))]
        if missing:
            more = len(missing) - 1
            others = f" (and {more} more missing image files)" if more else ""
            raise self._error(f"image file {os.path.join(self.image_dir, missing[0])} "
                              f"does not exist{others}")

    # --- reading samples ------------------------------------------------------

    def __len__(self):
        return len(self._images)

    def __repr__(self):
        return (f"CocoDataset({self.json_path!r}: {len(self)} images, "
                f"{self.num_classes} classes)")

    def _image_path_checked(self, info):
        """The image's path, after checking that PIL can open it and its size is the JSON's."""
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except OSError as err:  # includes PIL.UnidentifiedImageError
            raise CocoFormatError(f"{path}: cannot read the image ({err})") from err
        if (height, width) != (info["height"], info["width"]):
            raise CocoFormatError(
                f"{path}: the image is {height}x{width} (height x width) but {self.json_path} "
                f"says {info['height']}x{info['width']} for image id {info['id']}")
        return path

    def _read_image(self, info):
        """uint8 ``[H, W, 3]`` RGB pixels of one image."""
        path = self._image_path_checked(info)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)

    def _decode_mask(self, ann, height, width):
        mask = decode_segmentation(ann["segmentation"], height, width)
        if not mask.any():
            raise self._error("the segmentation decodes to an empty mask (no pixel inside)",
                              ann["id"])
        return mask

    def __getitem__(self, i):
        """The i-th image of the file as a sample (see the class docstring)."""
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a CocoDataset of {len(self)} images")
        i %= len(self)  # a negative index counts from the end, as for a list
        info = self._images[i]
        height, width = info["height"], info["width"]
        image = self._read_image(info)
        annotations = self._annotations_of[i]
        objects = [a for a in annotations if not a.get("iscrowd", 0)]
        crowds = [a for a in annotations if a.get("iscrowd", 0)]

        masks = np.zeros((len(objects), height, width), bool)
        for k, ann in enumerate(objects):
            masks[k] = self._decode_mask(ann, height, width)
        class_ids = np.array([self._class_of_category[a["category_id"]] for a in objects], np.int32)
        # Crowd regions keep their COCO bbox (no mask needed to ignore a region), clipped
        # to the image since the bbox may overhang by BOUNDS_TOLERANCE.
        crowd_xywh = np.array([a["bbox"] for a in crowds], np.float32).reshape(-1, 4)
        ignore_boxes = coco_xywh_to_yxyx(crowd_xywh).reshape(-1, 4)
        ignore_boxes = np.clip(ignore_boxes, 0.0, [height, width, height, width]).astype(np.float32)
        return {
            "image": image,
            "boxes": boxes_from_masks(masks),
            "class_ids": class_ids,
            "masks": masks,
            "ignore_boxes": ignore_boxes,
            "image_id": info["id"],
        }

    def validate(self):
        """Read and decode every sample; raises CocoFormatError on the first problem, else None.

        Construction checks what the JSON alone can tell; this also checks every image
        file (readable, of the size the JSON says) and every object mask (not empty).
        """
        for i in range(len(self)):
            self[i]


# ---------------------------------------------------------------------------
# Batching: padding to a fixed number of instances
# ---------------------------------------------------------------------------


def _describe(sample):
    return f"image id {sample['image_id']}" if "image_id" in sample else "the sample"


def _checked_arrays(sample):
    """The sample's arrays with the convention dtypes, after checking their shapes agree."""
    image = np.asarray(sample["image"])
    boxes = np.asarray(sample["boxes"], np.float32)
    class_ids = np.asarray(sample["class_ids"], np.int32)
    masks = np.asarray(sample["masks"], bool)
    ignore = np.asarray(sample.get("ignore_boxes", np.zeros((0, 4))), np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{_describe(sample)}: image must be uint8 [H, W, 3], "
                         f"got {image.dtype} {list(image.shape)}")
    n = len(boxes)
    h, w = image.shape[:2]
    if boxes.shape != (n, 4) or class_ids.shape != (n,) or masks.shape != (n, h, w):
        raise ValueError(
            f"{_describe(sample)}: expected boxes [N, 4], class_ids [N], masks [N, {h}, {w}]; "
            f"got {list(boxes.shape)}, {list(class_ids.shape)}, {list(masks.shape)}")
    if ignore.ndim != 2 or ignore.shape[1] != 4:
        raise ValueError(f"{_describe(sample)}: ignore_boxes must be [G, 4], "
                         f"got {list(ignore.shape)}")
    return image, boxes, class_ids, masks, ignore


def _pad_rows(array, rows):
    """Pad (with zeros/False) or cut ``array [N, ...]`` to ``[rows, ...]``."""
    out = np.zeros((rows,) + array.shape[1:], array.dtype)
    n = min(rows, len(array))
    out[:n] = array[:n]
    return out


def pad_sample(sample, max_instances, max_ignore=8, *, truncate=False):
    """Pad one sample's instance axes to fixed sizes: sample -> dict of fixed-shape arrays.

    Returns ``{"image": uint8 [H, W, 3], "boxes": float32 [M, 4] (y1, x1, y2, x2),
    "class_ids": int32 [M], "masks": bool [M, H, W], "num_instances": int32 [],
    "ignore_boxes": float32 [G, 4], "num_ignore": int32 []}`` with ``M = max_instances``
    and ``G = max_ignore``.  Rows past ``num_instances`` (``num_ignore``) are padding:
    their values (zeros here) carry no meaning and must never be used to find them.

    A sample with more than M instances (or G ignore boxes) raises ValueError naming
    the image, unless ``truncate=True``, which keeps the first M (G).  A sample with no
    "ignore_boxes" key has G = 0 of them.
    """
    image, boxes, class_ids, masks, ignore = _checked_arrays(sample)
    for count, limit, what in ((len(boxes), max_instances, "instances"),
                               (len(ignore), max_ignore, "ignore boxes")):
        if count > limit and not truncate:
            raise ValueError(
                f"{_describe(sample)} has {count} {what}, more than the maximum {limit}; "
                f"raise the maximum, or pass truncate=True to keep the first {limit}")
    return {
        "image": image,
        "boxes": _pad_rows(boxes, max_instances),
        "class_ids": _pad_rows(class_ids, max_instances),
        "masks": _pad_rows(masks, max_instances),
        "num_instances": np.int32(min(len(boxes), max_instances)),
        "ignore_boxes": _pad_rows(ignore, max_ignore),
        "num_ignore": np.int32(min(len(ignore), max_ignore)),
    }


def collate(samples, max_instances=None, max_ignore=None, *, truncate=False):
    """Stack samples into one padded numpy batch: list of B samples -> dict of ``[B, ...]`` arrays.

    The keys and shapes are those of :func:`make_dataset`'s batches.  ``max_instances``
    (``max_ignore``) defaults to the largest count among the samples.  All images must
    have the same size.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = {np.shape(s["image"])[:2] for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"collate needs images of one size, got (H, W) sizes {sorted(sizes)}")
    if max_instances is None:
        max_instances = max(len(s["boxes"]) for s in samples)
    if max_ignore is None:
        max_ignore = max(len(s.get("ignore_boxes", ())) for s in samples)
    padded = [pad_sample(s, max_instances, max_ignore, truncate=truncate) for s in samples]
    return {key: np.stack([p[key] for p in padded]) for key in padded[0]}


# ---------------------------------------------------------------------------
# The tf.data pipeline
# ---------------------------------------------------------------------------

# The order in which the numpy loader returns a padded sample's arrays.
BATCH_KEYS = ("image", "boxes", "class_ids", "masks", "num_instances", "ignore_boxes", "num_ignore")


def _first_size(source, transform):
    """(H, W) of source[0] (after the transform): the one image size of the pipeline."""
    sample = source[0]
    if transform is not None:
        sample = transform(sample)
    return tuple(int(d) for d in np.shape(sample["image"])[:2])


def _check_uniform_sizes(source):
    """If the source lists its image sizes (CocoDataset.image_sizes), check them all up front."""
    sizes = np.asarray(source.image_sizes).reshape(-1, 2)  # [len, 2] (H, W)
    different = np.any(sizes != sizes[0], axis=1)
    if different.any():
        i = int(np.argmax(different))
        raise ValueError(
            f"make_dataset needs images of one size for now: source[{i}] is "
            f"{sizes[i, 0]}x{sizes[i, 1]} but source[0] is {sizes[0, 0]}x{sizes[0, 1]} "
            "(height x width); resize them with a transform")


def make_dataset(source, batch_size, max_instances, *, shuffle=True, seed=0, repeat=True,
                 drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, max_ignore=8,
                 deterministic=True, truncate=False, transform=None, horizontal_flip=False):
    """tf.data pipeline: any ``source`` (``len``, ``source[i] -> sample``) -> padded batch dicts.

    Each element is a dict ``{"image": uint8 [B, H, W, 3], "boxes": float32 [B, M, 4]
    (y1, x1, y2, x2), "class_ids": int32 [B, M], "masks": bool [B, M, H, W],
    "num_instances": int32 [B], "ignore_boxes": float32 [B, G, 4], "num_ignore": int32 [B]}``
    with ``M = max_instances``, ``G = max_ignore``.  Rows past ``num_instances``
    (``num_ignore``) are padding and meaningless (see :func:`pad_sample`).

    The steps: an index order ``0..len-1``, shuffled with ``seed`` afresh each epoch
    (``reshuffle_each_iteration``: epoch e's order depends only on seed and e); repeated
    forever if ``repeat``; each index mapped in parallel through ``tf.numpy_function`` to
    ``source[i]`` -> ``transform`` (if given) -> :func:`pad_sample`; batched; prefetched.
    With ``deterministic=True`` the parallel map keeps the order, so the same seed
    gives the same batches.  ``source[i]`` must therefore be a pure function of ``i``,
    and safe to call from several threads at once.

    Shapes are static (``B`` too when ``drop_remainder=True``), so every image must
    have the size of ``source[0]`` (after ``transform``): a different one raises a
    ValueError, up front if the source has ``image_sizes`` (as :class:`CocoDataset`
    does) and no transform, else when that sample is loaded (TensorFlow then re-raises
    it as ``tf.errors.InvalidArgumentError`` with the same message).  ``transform`` is
    a callable sample -> sample applied to each sample before padding (resizing);
    ``truncate`` is passed on to :func:`pad_sample`.

    ``horizontal_flip=True`` mirrors each padded sample with probability 1/2
    (:func:`random_flip_left_right`), the coin of the ``i``-th sample of the (repeated)
    stream drawn from the stateless seed ``(seed, i)``: every epoch flips differently, and the
    same seed gives the same flips (also after ``dataset.skip(n)``, as a resumed run does).
    """
    if len(source) == 0:
        raise ValueError("make_dataset needs a source with at least one sample")
    if transform is None and hasattr(source, "image_sizes"):
        _check_uniform_sizes(source)
    height, width = _first_size(source, transform)

    def load(index):
        """numpy: source index -> the padded sample's arrays, in BATCH_KEYS order."""
        index = int(index)
        sample = source[index]
        if transform is not None:
            sample = transform(sample)
        size = tuple(np.shape(sample["image"])[:2])
        if size != (height, width):
            raise ValueError(
                f"source[{index}] ({_describe(sample)}) is {size[0]}x{size[1]} but the pipeline's "
                f"images are {height}x{width} (the size of source[0]); resize with a transform")
        try:
            padded = pad_sample(sample, max_instances, max_ignore, truncate=truncate)
        except ValueError as err:
            raise ValueError(f"source[{index}]: {err}") from err
        return tuple(padded[key] for key in BATCH_KEYS)

    out_types = (tf.uint8, tf.float32, tf.int32, tf.bool, tf.int32, tf.float32, tf.int32)
    out_shapes = ([height, width, 3], [max_instances, 4], [max_instances],
                  [max_instances, height, width], [], [max_ignore, 4], [])

    def load_tf(index):
        arrays = tf.numpy_function(load, [index], out_types, name="load_sample")
        # numpy_function forgets shapes: restore them so every batch has static shapes.
        for array, shape in zip(arrays, out_shapes):
            array.set_shape(shape)
        return dict(zip(BATCH_KEYS, arrays))

    dataset = tf.data.Dataset.range(len(source))
    if shuffle:
        dataset = dataset.shuffle(len(source), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(load_tf, num_parallel_calls=num_parallel_calls,
                          deterministic=deterministic)
    if horizontal_flip:
        def flip(position, sample):
            return random_flip_left_right(sample, tf.stack([tf.cast(seed, tf.int64), position]))

        dataset = dataset.enumerate().map(flip, num_parallel_calls=num_parallel_calls,
                                          deterministic=deterministic)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Augmentation: the horizontal flip of Mask R-CNN's training (He et al. 2017, Sec. 3.1)
# ---------------------------------------------------------------------------


def flip_left_right(sample):
    """A padded sample of TF tensors mirrored left-right: dict -> dict with the same keys and shapes.

    ``image [H, W, 3]`` and ``masks [M, H, W]`` are reversed along W; boxes and ignore boxes
    (y1, x1, y2, x2) become (y1, W - x2, y2, W - x1): pixel ``i``, which covers [i, i + 1),
    goes to ``W - 1 - i``, which covers [W - 1 - i, W - i).  Class ids, counts and any other
    key are unchanged (padding rows are flipped too, and stay meaningless).
    """
    width = tf.cast(tf.shape(sample["image"])[1], tf.float32)
    out = dict(sample)
    out["image"] = tf.reverse(sample["image"], axis=[1])  # [H, W, 3]
    out["masks"] = tf.reverse(sample["masks"], axis=[2])  # [M, H, W]
    for key in ("boxes", "ignore_boxes"):
        if key in sample:
            y1, x1, y2, x2 = tf.unstack(tf.cast(sample[key], tf.float32), axis=-1)  # [N] each
            out[key] = tf.stack([y1, width - x2, y2, width - x1], axis=-1)  # [N, 4]
    return out


def random_flip_left_right(sample, seed):
    """:func:`flip_left_right` of ``sample`` with probability 1/2; ``seed``: int ``[2]`` of the stateless coin."""
    heads = tf.random.stateless_uniform([], seed=seed) < 0.5
    return tf.cond(heads, lambda: flip_left_right(sample), lambda: dict(sample))


# ---------------------------------------------------------------------------
# Resizing to the model's fixed input size
# ---------------------------------------------------------------------------


def letterbox_image(image, size):
    """Scale ``image`` uint8 ``[H, W, 3]`` so its longer side is ``size``, pad bottom/right with 0.

    Returns ``(padded uint8 [size, size, 3], scale)``; a point ``p`` of the original is at
    ``p * scale`` in the padded image.  Bilinear resampling (PIL).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    padded = np.zeros((size, size, 3), np.uint8)
    padded[:new_h, :new_w] = image
    return padded, scale


def letterbox(sample, size):
    """A sample resized like :func:`letterbox_image`: masks resampled (nearest), boxes refitted.

    Boxes become the tight boxes of the resized masks; an instance whose mask vanishes at the
    smaller scale is dropped (it could not be learned at this resolution anyway).  Crowd boxes
    are scaled.  The returned sample carries ``"scale"``.
    """
    image, scale = letterbox_image(sample["image"], size)
    new_h, new_w = (round(d * scale) for d in np.shape(sample["image"])[:2])
    masks = np.asarray(sample["masks"], bool)
    resized = np.zeros((len(masks), size, size), bool)
    if len(masks):
        # nearest neighbour: output pixel centre (i + 0.5) / scale in the source
        rows = np.minimum(((np.arange(new_h) + 0.5) / scale).astype(np.int64), masks.shape[1] - 1)
        cols = np.minimum(((np.arange(new_w) + 0.5) / scale).astype(np.int64), masks.shape[2] - 1)
        resized[:, :new_h, :new_w] = masks[:, rows][:, :, cols]
    keep = resized.reshape(len(resized), size * size).any(axis=1)  # (an image may have no instance)
    out = dict(sample)
    out.update(image=image, masks=resized[keep], boxes=boxes_from_masks(resized[keep]),
               class_ids=np.asarray(sample["class_ids"], np.int32)[keep], scale=np.float32(scale))
    if "ignore_boxes" in sample:
        out["ignore_boxes"] = np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4) * scale
    return out
