"""Anchor explorer: which anchors does each object of an image get, and how do the settings change it?

Faster R-CNN (Ren et al. 2015, Sec. 3.1.2) trains the RPN on anchors labelled by their IoU with
the ground truth: object (IoU >= a positive threshold, or the best anchor of some object),
no object (IoU < a negative threshold), neutral (in between, left out of the loss); see
:func:`minimask.anchors.label_anchors`.  Whether an object is learnable depends on the anchor
layout of its pyramid level: the stride (anchor spacing), the sizes and the aspect ratios.  The
talk's lesson "convolution is very geometric: depict your sliding windows and downscaling
factors to check whether they make sense with your object sizes" is exactly this picture.

* :func:`draw_anchor_labels` draws the labelling of ONE level on a matplotlib axes (pure: the
  picture depends only on its arguments; testable);
* :func:`anchor_explorer` puts sliders around it (ipywidgets) in a notebook, or, without a widget
  front end, returns a static figure with one panel per pyramid level.

Boxes are float32 ``(y1, x1, y2, x2)`` in continuous pixels (:mod:`minimask.boxes`); ratios are
height / width, as everywhere in minimask.
"""
import dataclasses
import io
import numbers

import numpy as np
from matplotlib.figure import Figure

from minimask import anchors as anchor_ops
from minimask import visualize
from minimask.anchors import NEUTRAL, NO_OBJECT, OBJECT
from minimask.boxes import iou

# Colours and line styles of the picture.
NEGATIVE_STYLE = dict(color="tomato", linestyle=":", linewidth=0.8)
NEUTRAL_STYLE = dict(color="white", linestyle="--", linewidth=0.8)
UNCOVERED_COLOR = "red"
# The ratios the explorer offers (height / width), besides the config's own.
RATIO_CHOICES = (0.25, 0.5, 1.0, 2.0, 4.0)
STRIDE_CHOICES = (2, 4, 8, 16, 32, 64, 128)


@dataclasses.dataclass
class AnchorLabelSummary:
    """What :func:`draw_anchor_labels` drew: counts of the labels and the objects left uncovered."""

    num_anchors: int
    positives: int
    negatives: int
    neutrals: int
    best_iou: np.ndarray  # [N] best IoU of any anchor of this level with each object
    uncovered: np.ndarray  # indices of the objects with no anchor at IoU >= pos_iou
    without_positive: np.ndarray  # indices of the objects with no positive anchor at all


def _as_scales(scales):
    """A size or a sequence of sizes -> tuple of floats."""
    if isinstance(scales, numbers.Number):
        return (float(scales),)
    return tuple(float(s) for s in scales)


def _random_subset(indices, count, rng):
    return rng.choice(indices, size=min(count, len(indices)), replace=False) if len(indices) else indices


def label_level(sample, scales, ratios, stride, pos_iou, neg_iou, low_quality=True):
    """Anchors of one level over ``sample["image"]`` and their labels -> (anchors ``[A, 4]``,
    labels ``[A]``, matched ``[A]``, IoU ``[A, N]``), from :mod:`minimask.anchors`."""
    image_shape = tuple(np.shape(sample["image"])[:2])
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
    anchors = anchor_ops.generate_anchors(image_shape, strides=(int(stride),), scales=(_as_scales(scales),),
                                          ratios=tuple(float(r) for r in ratios))
    labels, matched = anchor_ops.label_anchors(anchors, boxes[None], [len(boxes)], positive_threshold=pos_iou,
                                               negative_threshold=neg_iou, allow_low_quality_matches=low_quality)
    overlaps = iou(anchors, boxes).numpy().reshape(len(anchors), len(boxes))  # [A, N]
    return anchors, labels.numpy()[0], matched.numpy()[0], overlaps


def draw_anchor_labels(ax, sample, scales, ratios, stride, pos_iou, neg_iou, *, low_quality=True,
                       max_negatives=40, max_neutrals=20, seed=0, title=True):
    """Draw the anchor labels of one pyramid level over a sample on ``ax`` -> :class:`AnchorLabelSummary`.

    ``sample``: ``{"image" [H, W, 3], "boxes" [N, 4] (y1, x1, y2, x2), optional "masks" [N, H, W]}``;
    the level: anchor sizes ``scales`` (pixels, sqrt of the area), ``ratios`` (height / width) and
    ``stride``; labelled with :func:`minimask.anchors.label_anchors` at ``pos_iou`` / ``neg_iou``
    (``low_quality``: each object's best anchors are positive too).

    Drawn: the objects (masks and thin boxes in their colours); every positive anchor in the colour
    of its object, solid when its IoU reaches ``pos_iou``, dashed when it is only a low-quality
    (best-match) positive; a random ``max_negatives`` negatives (red, dotted) and ``max_neutrals``
    neutrals (white, dashed), since all of them would hide the image; and, thick red with their
    best IoU, the objects left without an anchor at ``pos_iou``.
    """
    anchors, labels, matched, overlaps = label_level(sample, scales, ratios, stride, pos_iou, neg_iou, low_quality)
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
    n = len(boxes)
    colours = visualize.instance_colors(n)
    masks = sample.get("masks")
    visualize.draw_instances(ax, sample["image"], boxes=boxes, masks=None if masks is None else np.asarray(masks),
                             colors=colours)

    positive = np.flatnonzero(labels == OBJECT)
    strong = overlaps[positive, matched[positive]] >= pos_iou if n else np.zeros(0, bool)
    for keep, style in ((strong, "-"), (~strong, "--")):
        chosen = positive[keep]
        visualize.draw_boxes(ax, anchors[chosen], color=[colours[m] for m in matched[chosen]], linestyle=style,
                             linewidth=1.5)
    rng = np.random.default_rng(seed)
    for value, count, style in ((NO_OBJECT, max_negatives, NEGATIVE_STYLE), (NEUTRAL, max_neutrals, NEUTRAL_STYLE)):
        chosen = _random_subset(np.flatnonzero(labels == value), count, rng)
        visualize.draw_boxes(ax, anchors[chosen], **style)

    best_iou = overlaps.max(axis=0) if len(anchors) and n else np.zeros(n, np.float32)  # [N]
    uncovered = np.flatnonzero(best_iou < pos_iou)
    has_positive = np.zeros(n, bool)
    has_positive[matched[positive]] = True
    without_positive = np.flatnonzero(~has_positive)
    visualize.draw_boxes(ax, boxes[uncovered], color=UNCOVERED_COLOR, linewidth=2.5,
                         labels=[f"best {best_iou[i]:.2f}" for i in uncovered])
    summary = AnchorLabelSummary(
        num_anchors=len(anchors), positives=len(positive), negatives=int(np.sum(labels == NO_OBJECT)),
        neutrals=int(np.sum(labels == NEUTRAL)), best_iou=best_iou, uncovered=uncovered,
        without_positive=without_positive)
    if title:
        sizes = "/".join(f"{s:g}" for s in _as_scales(scales))
        ratio_text = "/".join(f"{r:g}" for r in ratios)
        ax.set_title(f"stride {stride}, size {sizes}, ratios {ratio_text}, IoU {pos_iou:g}/{neg_iou:g}\n"
                     f"{summary.positives} positive, {summary.negatives} negative, {summary.neutrals} neutral; "
                     f"{len(uncovered)} of {n} objects without an anchor >= {pos_iou:g}", fontsize=8)
    return summary


def widgets_available():
    """True in a Jupyter kernel with ipywidgets importable (a widget front end can be there)."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def static_anchor_figure(sample, config, panel_size=3.2):
    """The static picture: one panel per pyramid level of ``config`` (its strides, sizes, ratios,
    thresholds) -> a matplotlib ``Figure`` (not managed by pyplot)."""
    levels = len(config.anchor_strides)
    figure = Figure(figsize=(panel_size * levels, panel_size + 0.6))
    axes = figure.subplots(1, levels, squeeze=False)[0]
    for level, ax in enumerate(axes):
        scales, stride = config.anchor_scales[level], config.anchor_strides[level]
        summary = draw_anchor_labels(ax, sample, scales, config.anchor_ratios, stride, config.rpn_positive_iou,
                                     config.rpn_negative_iou, title=False)
        ax.set_title(f"P{level + 2}: stride {stride}, size {'/'.join(f'{s:g}' for s in _as_scales(scales))}\n"
                     f"{summary.positives} pos, {summary.negatives} neg, {summary.neutrals} neutral; "
                     f"{len(summary.uncovered)}/{len(summary.best_iou)} objects < {config.rpn_positive_iou:g}",
                     fontsize=8)
    figure.suptitle(f"anchor labels per level (IoU {config.rpn_positive_iou:g} / {config.rpn_negative_iou:g}, "
                    f"ratios {'/'.join(f'{r:g}' for r in config.anchor_ratios)}): solid = positive, dashed = "
                    "best-match positive, red dotted = negative, white dashed = neutral, thick red = object "
                    "without an anchor at the positive IoU", fontsize=8)
    figure.tight_layout()
    return figure


def anchor_explorer(sample, config, *, static=None, level=0):
    """Explore the anchor labels of ``sample`` under ``config``: an interactive view or a static figure.

    ``static=None`` chooses: interactive in a Jupyter kernel with ipywidgets (see
    :func:`widgets_available`), else static.  ``static=True`` returns
    :func:`static_anchor_figure` (one panel per level; shown when it is a cell's last expression).
    ``static=False`` shows an :class:`AnchorExplorer` (controls for the level, stride, anchor
    size, ratios and both IoU thresholds over a picture of :func:`draw_anchor_labels`) and
    returns it.  The picture is a plain image output updated in place, so a saved notebook shows
    the last view even where widgets cannot run (nbval, static renders).
    """
    if static is None:
        static = not widgets_available()
    if static:
        return static_anchor_figure(sample, config)
    explorer = AnchorExplorer(sample, config, level=level)
    explorer.show()
    return explorer


class AnchorExplorer:
    """ipywidgets controls around :func:`draw_anchor_labels` for one sample and config.

    ``controls`` is the widget box; ``state()`` the current settings; ``redraw()`` draws them
    (also called by every control change) into ``png`` and ``summary``.
    """

    def __init__(self, sample, config, level=0):
        try:
            import ipywidgets as widgets
        except ImportError as err:
            raise ImportError("the interactive anchor explorer needs ipywidgets; use static=True") from err
        self.sample = sample
        self.config = config
        strides = config.anchor_strides
        self.level = widgets.Dropdown(options=[(f"P{k + 2} (stride {s})", k) for k, s in enumerate(strides)],
                                      value=level, description="level")
        self.stride = widgets.Dropdown(options=sorted(set(STRIDE_CHOICES) | set(strides)), value=strides[level],
                                       description="stride")
        # one slider for the level's first size; its other sizes keep their ratio to it
        self.size = widgets.FloatLogSlider(value=config.anchor_scales[level][0], base=2, min=1, max=10, step=0.125,
                                           description="size (px)")
        ratio_options = sorted(set(RATIO_CHOICES) | set(config.anchor_ratios))
        self.ratios = widgets.SelectMultiple(options=ratio_options, value=tuple(config.anchor_ratios),
                                             description="h / w ratios", rows=len(ratio_options))
        self.pos_iou = widgets.FloatSlider(value=config.rpn_positive_iou, min=0.05, max=0.95, step=0.05,
                                           description="positive IoU")
        self.neg_iou = widgets.FloatSlider(value=config.rpn_negative_iou, min=0.0, max=0.95, step=0.05,
                                           description="negative IoU")
        self.low_quality = widgets.Checkbox(value=True, description="best anchor of each object is positive")
        self.controls = widgets.VBox([self.level, self.stride, self.size, self.ratios, self.pos_iou, self.neg_iou,
                                      self.low_quality])
        self._quiet = False  # set while a control is moved by the code, so one change draws once
        self._handle = None
        self.png, self.summary = None, None
        self.level.observe(self._on_level, names="value")
        for control in (self.stride, self.size, self.ratios, self.pos_iou, self.neg_iou, self.low_quality):
            control.observe(self._on_change, names="value")
        self.redraw()

    def state(self):
        """The current settings, as :func:`draw_anchor_labels` takes them (a dict)."""
        base = self.config.anchor_scales[self.level.value]
        scales = tuple(self.size.value * s / base[0] for s in base)
        return {"scales": scales, "ratios": tuple(self.ratios.value) or (1.0,), "stride": self.stride.value,
                "pos_iou": self.pos_iou.value, "neg_iou": min(self.neg_iou.value, self.pos_iou.value),
                "low_quality": self.low_quality.value}

    def render(self):
        """The current view -> (PNG bytes, :class:`AnchorLabelSummary`)."""
        figure = Figure(figsize=(5, 5.4))
        ax = figure.add_subplot()
        summary = draw_anchor_labels(ax, self.sample, **self.state())
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue(), summary

    def redraw(self):
        self.png, self.summary = self.render()
        if self._handle is not None:
            from IPython.display import Image

            self._handle.update(Image(self.png))

    def _on_level(self, change):
        level = change["new"]
        self._quiet = True  # moving stride and size is part of this change: draw once, below
        self.stride.value = self.config.anchor_strides[level]
        self.size.value = self.config.anchor_scales[level][0]
        self._quiet = False
        self.redraw()

    def _on_change(self, change):
        if self._quiet:
            return
        if self.neg_iou.value > self.pos_iou.value:  # label_anchors needs negative <= positive
            self._quiet = True
            self.neg_iou.value = self.pos_iou.value
            self._quiet = False
        self.redraw()

    def show(self):
        """Display the controls and the picture (once; later calls only redraw)."""
        from IPython.display import Image, display

        if self._handle is None:
            display(self.controls)
            self._handle = display(Image(self.png), display_id=True)
        else:
            self.redraw()

    def _ipython_display_(self):
        self.show()
