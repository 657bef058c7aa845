"""Visualize: draw an image with its instances (boxes, class labels, scores, masks) in matplotlib.

Looking at the data and at the predictions is most of debugging a detector: the
figures of the Mask R-CNN paper (He et al. 2017, Figs. 2, 5, 6) show exactly this, a
translucent colour mask per instance, its box, and "class score" as text.

Coordinates.  minimask boxes are continuous (:mod:`minimask.boxes`): pixel ``(i, j)``
covers ``[i, i+1) x [j, j+1)``.  ``imshow`` (with its default extent) draws pixel
``(i, j)`` centred at ``(x=j, y=i)``, covering ``[j - 0.5, j + 0.5]``.  So a box
``(y1, x1, y2, x2)`` is drawn as a rectangle from ``(x1 - 0.5, y1 - 0.5)`` with width
``x2 - x1`` and height ``y2 - y1``: it hugs the outer edges of its pixels.

Functions:

* :func:`draw_instances` -- one image with everything on it;
* :func:`draw_boxes` -- just rectangles (anchors, proposals, crowd regions...);
* :func:`draw_mask` -- one translucent mask with its outline;
* :func:`show_samples` -- a grid of samples as a new figure.

Colours come from a fixed palette (:data:`PALETTE`): instance k is always drawn in
``PALETTE[k % len(PALETTE)]``, so two plots of the same data look the same.
"""
import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import is_color_like, to_rgb
from matplotlib.patches import Rectangle
from skimage.measure import find_contours

# 20 distinct colours: the strong half of matplotlib's "tab20" first, then the light half.
PALETTE = tuple(colormaps["tab20"].colors[0::2] + colormaps["tab20"].colors[1::2])
MASK_ALPHA = 0.45  # opacity of a mask overlay: the image stays visible underneath
LABEL_FONTSIZE = 8


def instance_colors(n):
    """Colours of instances ``0..n-1``: ``n`` RGB tuples, cycling through :data:`PALETTE`."""
    return [PALETTE[k % len(PALETTE)] for k in range(n)]


def _colors_for(color, n):
    """One colour per item: ``color`` is a single matplotlib colour or a sequence of ``n``."""
    if is_color_like(color):
        return [color] * n
    colors = list(color)
    if len(colors) != n:
        raise ValueError(f"got {len(colors)} colours for {n} instances")
    return colors


def _as_boxes(boxes):
    boxes = np.asarray(boxes, np.float32)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)  # also accept [] for "no boxes"
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (y1, x1, y2, x2), got shape {list(boxes.shape)}")
    return boxes


def draw_boxes(ax, boxes, color="yellow", labels=None, linestyle="-", linewidth=1.5):
    """Draw ``boxes [N, 4]`` (y1, x1, y2, x2, image pixels) on ``ax`` -> list of N Rectangles.

    ``color`` is one matplotlib colour or one per box; ``labels`` (optional) a string
    per box, written at the box's top-left corner.  The axis limits are not changed,
    so boxes outside the current view (e.g. border anchors) are simply cut off.
    """
    boxes = _as_boxes(boxes)
    colors = _colors_for(color, len(boxes))
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"got {len(labels)} labels for {len(boxes)} boxes")
    rectangles = []
    for k, (y1, x1, y2, x2) in enumerate(boxes):
        # imshow centres pixel i at i, so the continuous coordinate c sits at c - 0.5.
        rectangle = Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                              edgecolor=colors[k], linestyle=linestyle, linewidth=linewidth)
        ax.add_patch(rectangle)
        rectangles.append(rectangle)
        if labels is not None:
            _draw_label(ax, x1 - 0.5, y1 - 0.5, labels[k], colors[k])
    return rectangles


def _draw_label(ax, x, y, text, color):
    ax.text(x, y, text, color="white", fontsize=LABEL_FONTSIZE, va="top", ha="left",
            bbox=dict(facecolor=color, alpha=0.7, pad=1, edgecolor="none"), clip_on=True)


def draw_mask(ax, mask, color, alpha=MASK_ALPHA):
    """Draw one bool mask ``[H, W]`` on ``ax``: a translucent fill plus an outline."""
    mask = np.asarray(mask, bool)
    overlay = np.zeros(mask.shape + (4,), np.float32)  # [H, W, RGBA], transparent off the mask
    overlay[mask] = (*to_rgb(color), alpha)
    ax.imshow(overlay, interpolation="nearest")
    # Pad by one pixel so that a mask touching the border still gets a closed outline;
    # find_contours works in (row, col) of the padded array, hence the -1.
    for contour in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        ax.plot(contour[:, 1] - 1, contour[:, 0] - 1, color=color, linewidth=1.0)


def _instance_count(**arrays):
    """The common length N of the given (non-None) per-instance arrays; ValueError if not."""
    lengths = {name: len(a) for name, a in arrays.items() if a is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-instance inputs have different lengths: {lengths}")
    return next(iter(lengths.values()), 0)


def _labels(class_ids, scores, class_names, n):
    """'name score' per instance (name only, or score only, when only one is given)."""
    labels = []
    for k in range(n):
        parts = []
        if class_ids is not None:
            class_id = int(class_ids[k])
            parts.append(class_names[class_id] if class_names is not None else str(class_id))
        if scores is not None:
            parts.append(f"{float(scores[k]):.2f}")
        labels.append(" ".join(parts))
    return labels


def draw_instances(ax, image, boxes=None, class_ids=None, masks=None, scores=None,
                   class_names=None, colors=None, title=None, show_labels=True):
    """Draw ``image [H, W, 3]`` (or ``[H, W]``) with its N instances on ``ax`` -> ``ax``.

    ``boxes [N, 4]`` (y1, x1, y2, x2, image pixels) as rectangles; ``masks`` bool
    ``[N, H, W]`` as translucent overlays with outlines; ``class_ids [N]`` (names from
    ``class_names[k]`` if given) and ``scores [N]`` as a "name score" label at each
    box's (or, without boxes, each mask's) top-left corner.  All optional, but the
    given ones must have the same N (N = 0 draws just the image).  ``colors``: one
    per instance, default :func:`instance_colors`.  The view is set to the image.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W, 3] or [H, W], got shape {list(image.shape)}")
    height, width = image.shape[:2]
    n = _instance_count(boxes=boxes, class_ids=class_ids, masks=masks, scores=scores)
    colors = instance_colors(n) if colors is None else _colors_for(colors, n)

    ax.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None)
    if masks is not None:
        masks = np.asarray(masks, bool)
        if n == 0:
            masks = masks.reshape(0, height, width)  # also accept [] for "no masks"
        if masks.shape != (n, height, width):
            raise ValueError(f"masks must be [N, {height}, {width}] like the image, "
                             f"got shape {list(masks.shape)}")
        for mask, color in zip(masks, colors):
            draw_mask(ax, mask, color)

    wants_labels = show_labels and (class_ids is not None or scores is not None)
    labels = _labels(class_ids, scores, class_names, n) if wants_labels else None
    if boxes is not None:
        draw_boxes(ax, boxes, colors, labels=labels)
    elif labels is not None:
        if masks is None:
            raise ValueError("labels (class_ids or scores) need boxes or masks to be placed on")
        for k, mask in enumerate(masks):
            rows, cols = np.nonzero(mask)
            if len(rows):
                _draw_label(ax, cols.min() - 0.5, rows.min() - 0.5, labels[k], colors[k])

    # Show the whole image and nothing more (pixel centres at 0..W-1, y pointing down).
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def show_samples(samples, class_names=None, ncols=4, size=3):
    """A new figure: a grid of samples (dicts with "image", "boxes", "class_ids", "masks").

    Each sample is drawn by :func:`draw_instances` (with "scores" if it has them),
    titled "image <image_id>" when it has an "image_id", and its "ignore_boxes" (crowd
    regions) drawn dashed white.  A padded sample (with "num_instances"/"num_ignore")
    shows only its valid rows.  ``size`` is the side of one panel in inches.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("show_samples needs at least one sample")
    ncols = min(ncols, len(samples))
    nrows = math.ceil(len(samples) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax, sample in zip(axes.flat, samples):
        n = int(sample.get("num_instances", len(sample["boxes"])))
        scores = sample.get("scores")
        draw_instances(
            ax, sample["image"], sample["boxes"][:n], sample["class_ids"][:n],
            sample["masks"][:n], None if scores is None else scores[:n], class_names,
            title=f"image {sample['image_id']}" if "image_id" in sample else None)
        if "ignore_boxes" in sample:
            g = int(sample.get("num_ignore", len(sample["ignore_boxes"])))
            draw_boxes(ax, sample["ignore_boxes"][:g], "white", linestyle="--")
    for ax in axes.flat[len(samples):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig
