"""MNIST-detection scenes: a tiny stand-in for COCO that a laptop CPU can train on.

Mask R-CNN (He et al. 2017) needs images with several objects, each with a class, a
box and a pixel mask.  We make such images by pasting handwritten MNIST digits on a
dark canvas:

1. background: a random dark colour plus uniform noise;
2. digits: drawn from this split's *pool* (:func:`synthetic_data.mnist.split_pools`),
   resized (bilinear) to a random square size, placed so that no two digit squares
   overlap by more than ``max_overlap`` IoU, painted in a random bright colour and
   alpha-blended using the digit's ink intensity; later digits cover earlier ones;
3. annotations: a digit's mask is its ink (at least half its brightest pixel) minus the ink of every
   digit drawn after it (occlusion), so masks of different instances never overlap;
   a digit left with less than ``min_visible`` of its own ink (or none) is not
   annotated; the box is the tight box of the visible mask; class id = digit + 1.

Each sample is a dict following the conventions of :mod:`minimask.boxes`
(``image`` uint8 [H, W, 3], ``boxes`` float32 [N, 4] (y1, x1, y2, x2),
``class_ids`` int32 [N], ``masks`` bool [N, H, W]) plus ``image_id`` (int, index + 1,
as COCO ids start at 1) and ``digit_index`` int32 [N] (which MNIST image each instance is).

Sample ``i`` depends only on (configuration, split, seed, i): it has its own random
generator ``np.random.default_rng([seed, split_id, i])``, so any worker can produce
any sample in any order and get the same bytes.
"""
from typing import NamedTuple

import numpy as np
from PIL import Image

from minimask.boxes import boxes_from_masks
from synthetic_data.mnist import SPLITS, load_mnist, split_pools

CATEGORY_NAMES = ["background"] + [str(digit) for digit in range(10)]
SPLIT_IDS = {name: k for k, name in enumerate(SPLITS)}  # train 0, val 1, test 2

# A pixel is "ink" (part of the digit's mask) when its intensity in the resized patch is
# at least this fraction of the patch's brightest pixel.  Relative, not absolute: shrinking a
# thin digit to 14 px blurs its strokes below half of full ink, and an absolute threshold
# would then keep only a few pixels of a clearly visible digit.  The faint anti-aliased rim
# below the threshold is drawn but not annotated.
INK_FRACTION = 0.5
# Background: a colour with channels in [0, 64) plus uniform noise in [-a, a], with the
# amplitude a drawn per scene from this range (uniform: 5x faster to draw than Gaussian).
BACKGROUND_MAX_LEVEL = 64
NOISE_AMPLITUDE_RANGE = (4.0, 16.0)
# Digit colours: channels in [96, 256), one channel forced to 255 so every digit is bright.
DIGIT_MIN_LEVEL = 96
# A digit that finds no position respecting max_overlap in this many tries is skipped.
MAX_PLACEMENT_TRIES = 20


class SceneLayers(NamedTuple):
    """A scene before annotation: every digit drawn, in drawing order (K digits).

    image uint8 [H, W, 3]; full_masks bool [K, H, W] (each digit's own ink, ignoring
    occlusion); squares int64 [K, 4] (y1, x1, y2, x2) of the pasted digit patches;
    digit_index int32 [K] (row of the MNIST images); class_ids int32 [K] (digit + 1).
    """

    image: np.ndarray
    full_masks: np.ndarray
    squares: np.ndarray
    digit_index: np.ndarray
    class_ids: np.ndarray


def iou_one_to_many(box, boxes):
    """IoU of one box ``[4]`` with each of ``boxes [K, 4]`` -> ``[K]``; (y1, x1, y2, x2).

    A numpy version of :func:`minimask.boxes.iou` for one row (the placement loop calls
    it per try, where a TensorFlow call would cost more than the whole scene); the
    tests check that the two agree.
    """
    box = np.asarray(box, np.float64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    top_left = np.maximum(box[:2], boxes[:, :2])  # [K, 2]
    bottom_right = np.minimum(box[2:], boxes[:, 2:])  # [K, 2]
    size = np.maximum(bottom_right - top_left, 0.0)
    intersection = size[:, 0] * size[:, 1]
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    area_boxes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area_box + area_boxes - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def occlude(full_masks):
    """Visible masks: bool ``[K, H, W]`` in drawing order -> bool ``[K, H, W]``.

    Digit k keeps the pixels of its ink that no later digit (k+1..K-1) inks over.
    """
    full_masks = np.asarray(full_masks, bool)
    # covered_after[k] = OR of full_masks[k+1:], built from the last digit back.  A loop
    # over the (at most max_digits) layers: 40x faster than np.logical_or.accumulate.
    covered_after = np.zeros_like(full_masks)
    for k in range(len(full_masks) - 2, -1, -1):
        covered_after[k] = covered_after[k + 1] | full_masks[k + 1]
    return full_masks & ~covered_after


def annotate(layers, min_visible):
    """Sample arrays of a drawn scene: ``SceneLayers`` -> dict of boxes/class_ids/masks/digit_index.

    Masks are the occluded ink; instances whose visible ink is empty or below
    ``min_visible`` of their full ink are dropped.  Boxes are the tight boxes of the
    visible masks (y1, x1, y2, x2), so an empty scene gives boxes [0, 4], masks [0, H, W].
    """
    visible = occlude(layers.full_masks)  # [K, H, W]
    visible_pixels = visible.sum(axis=(1, 2))  # [K]
    full_pixels = layers.full_masks.sum(axis=(1, 2))  # [K]
    keep = (visible_pixels > 0) & (visible_pixels >= min_visible * full_pixels)
    masks = visible[keep]
    return {
        "boxes": boxes_from_masks(masks).reshape(-1, 4),
        "class_ids": layers.class_ids[keep].astype(np.int32),
        "masks": masks,
        "digit_index": layers.digit_index[keep].astype(np.int32),
    }


class MnistDetection:
    """Index-addressable MNIST-detection scenes: ``dataset[i]`` -> sample dict (see module doc).

    ``split`` chooses the digit pool ("train", "val" or "test"; pools are disjoint,
    fixed by ``pool_seed`` and ``pool_fractions``, NOT by ``seed``); ``seed`` chooses
    the scenes.  ``digit_size`` = (smallest, largest) side of the square digit patch
    in pixels; ``max_overlap`` caps the IoU between any two digit patches;
    ``min_visible`` is the fraction of a digit's own ink that must stay uncovered for
    it to be annotated; ``empty_fraction`` is the probability that a scene has no digit.
    The mask of a digit is its ink relative to the patch's brightest pixel (``INK_FRACTION``),
    so even a small, blurred digit keeps the mask of its visible strokes.
    """

    category_names = CATEGORY_NAMES
    num_classes = 10

    def __init__(
        self,
        split="train",
        num_scenes=1000,
        seed=0,
        *,
        image_size=128,
        min_digits=1,
        max_digits=6,
        empty_fraction=0.05,
        digit_size=(14, 64),
        max_overlap=0.3,
        min_visible=0.5,
        source="bundled",
        pool_fractions=(0.8, 0.1, 0.1),
        pool_seed=0,
    ):
        digit_size = tuple(int(s) for s in digit_size)
        _check_config(split, num_scenes, seed, image_size, min_digits, max_digits,
                      empty_fraction, digit_size, max_overlap, min_visible)
        self.split = split
        self.num_scenes = int(num_scenes)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.min_digits = int(min_digits)
        self.max_digits = int(max_digits)
        self.empty_fraction = float(empty_fraction)
        self.digit_size = digit_size
        self.max_overlap = float(max_overlap)
        self.min_visible = float(min_visible)
        self.source = source
        self.pool_fractions = tuple(float(f) for f in pool_fractions)
        self.pool_seed = int(pool_seed)
        self.digit_images, self.digit_labels = load_mnist(source)
        self.pool = split_pools(len(self.digit_labels), self.pool_fractions, self.pool_seed)[split]
        if len(self.pool) == 0 and self.max_digits > 0:
            raise ValueError(f"the {split} pool is empty with pool_fractions={self.pool_fractions}")

    def config(self):
        """The generator settings (everything but split and num_scenes) as a JSON-friendly dict."""
        return {
            "seed": self.seed, "image_size": self.image_size, "min_digits": self.min_digits,
            "max_digits": self.max_digits, "empty_fraction": self.empty_fraction,
            "digit_size": list(self.digit_size), "max_overlap": self.max_overlap,
            "min_visible": self.min_visible, "source": self.source,
            "pool_fractions": list(self.pool_fractions), "pool_seed": self.pool_seed,
        }

    def __len__(self):
        return self.num_scenes

    def __getitem__(self, index):
        """Sample ``index`` -> {"image", "boxes", "class_ids", "masks", "image_id", "digit_index"}."""
        index = self._check_index(index)
        layers = self.draw(index)
        sample = {"image": layers.image, **annotate(layers, self.min_visible)}
        sample["image_id"] = index + 1
        return sample

    def _check_index(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"scene index must be an integer, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.num_scenes
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene index out of range for {self.num_scenes} scenes")
        return index

    def rng(self, index):
        """The random generator of scene ``index`` (its only source of randomness)."""
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])

    def draw(self, index):
        """Render scene ``index`` before annotation -> :class:`SceneLayers` (all drawn digits)."""
        index = self._check_index(index)
        rng = self.rng(index)
        size = self.image_size
        canvas = _background(rng, size)  # float32 [H, W, 3]
        is_empty = rng.random() < self.empty_fraction
        num_digits = 0 if is_empty else int(rng.integers(self.min_digits, self.max_digits + 1))
        squares = _place_squares(rng, num_digits, size, self.digit_size, self.max_overlap)  # [K, 4]
        digit_index = self.pool[rng.integers(0, len(self.pool), size=len(squares))]  # [K]
        full_masks = np.zeros([len(squares), size, size], bool)
        for k, (y1, x1, y2, x2) in enumerate(squares):  # at most max_digits digits
            patch = _resize_digit(self.digit_images[digit_index[k]], y2 - y1)  # uint8 [s, s]
            _paint(canvas[y1:y2, x1:x2], patch, _bright_colour(rng))
            full_masks[k, y1:y2, x1:x2] = ink_mask(patch)
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        class_ids = self.digit_labels[digit_index].astype(np.int32) + 1
        return SceneLayers(image, full_masks, squares, digit_index.astype(np.int32), class_ids)


def _check_config(split, num_scenes, seed, image_size, min_digits, max_digits,
                  empty_fraction, digit_size, max_overlap, min_visible):
    """Raise ValueError naming the first bad generator setting."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(num_scenes) < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 <= int(min_digits) <= int(max_digits):
        raise ValueError(f"need 0 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not 0.0 <= float(empty_fraction) <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    if len(digit_size) != 2 or not 1 <= digit_size[0] <= digit_size[1] <= int(image_size):
        raise ValueError(
            f"digit_size must be (smallest, largest) with 1 <= smallest <= largest <= image_size "
            f"({image_size}), got {digit_size}"
        )
    if not 0.0 <= float(max_overlap) <= 1.0:
        raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap}")
    if not 0.0 <= float(min_visible) <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")


def _background(rng, size):
    """A dark noisy canvas: float32 [size, size, 3] = dark colour + uniform noise."""
    colour = rng.integers(0, BACKGROUND_MAX_LEVEL, size=3).astype(np.float32)
    amplitude = np.float32(rng.uniform(*NOISE_AMPLITUDE_RANGE))
    noise = rng.random((size, size, 3), dtype=np.float32)  # in [0, 1)
    return colour + amplitude * (2.0 * noise - 1.0)


def _place_squares(rng, num_digits, image_size, digit_size, max_overlap):
    """Random digit squares, int64 [K <= num_digits, 4] (y1, x1, y2, x2), pairwise IoU <= max_overlap."""
    placed = []
    for _ in range(num_digits):
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        # All tries drawn at once: [T, 2] top-left corners inside the canvas.
        corners = rng.integers(0, image_size - side + 1, size=(MAX_PLACEMENT_TRIES, 2))
        for y1, x1 in corners:
            square = np.array([y1, x1, y1 + side, x1 + side], np.int64)
            if not placed or iou_one_to_many(square, np.stack(placed)).max() <= max_overlap:
                placed.append(square)
                break
    return np.stack(placed) if placed else np.zeros([0, 4], np.int64)


def ink_mask(patch):
    """uint8 digit patch -> bool mask of its ink (see ``INK_FRACTION``); an all-dark patch has none."""
    peak = int(patch.max())
    return (patch >= INK_FRACTION * peak) & (peak > 0)


def _resize_digit(digit, side):
    """28x28 uint8 digit -> ``side x side`` uint8 patch (bilinear, PIL)."""
    return np.asarray(Image.fromarray(digit).resize((int(side), int(side)), Image.BILINEAR))


def _bright_colour(rng):
    """A random bright RGB colour, float32 [3]: one channel at 255, the others in [96, 256)."""
    colour = rng.integers(DIGIT_MIN_LEVEL, 256, size=3)
    colour[rng.integers(0, 3)] = 255
    return colour.astype(np.float32)


def _paint(region, patch, colour):
    """Alpha-blend ``colour`` into ``region`` (float32 [s, s, 3], a view) with alpha = ink / 255."""
    alpha = patch[..., None].astype(np.float32) / 255.0  # [s, s] -> [s, s, 1]
    region += alpha * (colour - region)
