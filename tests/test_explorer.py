"""minimask.explorer: the anchor-label picture against a brute-force labelling, and the widget
with its static fallback (no widget front end in pytest: the interactive path runs headless)."""
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from conftest import tiny_config  # noqa: E402
from minimask import explorer  # noqa: E402
from minimask.anchors import NEUTRAL, NO_OBJECT, OBJECT  # noqa: E402


def pair_iou(a, b):
    """IoU of two (y1, x1, y2, x2) boxes, plain Python (reference)."""
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def reference_labels(image_size, stride, size, ratios, boxes, pos, neg, tie_tolerance=1e-5):
    """Anchors of one level and their labels by loops: Faster R-CNN Sec. 3.1.2, written for reading.

    Returns (labels [A], IoU-rule labels [A], best IoU of each box [N], tied [A]).  An object's best
    anchors are all positive, ties included.  ``tied`` marks the anchors of an object's best IoU
    when several anchors are within ``tie_tolerance`` of it: equal in exact arithmetic (a small
    object inside several anchors of one shape), so float32 may round any of them below the others;
    their label may be positive or the IoU rule's (each object keeps at least one positive).
    """
    anchors = []
    for row in range(image_size // stride):
        for col in range(image_size // stride):
            cy, cx = (row + 0.5) * stride, (col + 0.5) * stride
            for ratio in ratios:  # height / width, area size**2
                h, w = size * ratio ** 0.5, size / ratio ** 0.5
                anchors.append((cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2))
    overlaps = [[pair_iou(a, b) for b in boxes] for a in anchors]
    best_of_box = [max(overlaps[i][j] for i in range(len(anchors))) for j in range(len(boxes))]
    near_best = [[abs(best_of_box[j] - row[j]) < tie_tolerance for j in range(len(boxes))] for row in overlaps]
    group_size = [sum(near[j] for near in near_best) for j in range(len(boxes))]
    labels, rule_labels, tied = [], [], []
    for row, near in zip(overlaps, near_best):
        best = max(row) if row else 0.0
        is_best = any(row[j] == best_of_box[j] and best_of_box[j] > 0 for j in range(len(boxes)))
        rule = OBJECT if best >= pos else NO_OBJECT if best < neg else NEUTRAL
        labels.append(OBJECT if is_best else rule)
        rule_labels.append(rule)
        tied.append(any(near[j] and group_size[j] > 1 and best_of_box[j] > 0 for j in range(len(boxes))))
    return np.array(labels), np.array(rule_labels), np.array(best_of_box), np.array(tied)


def scene(boxes, size=32):
    """A dark image with bright rectangles at ``boxes`` and their masks."""
    image = np.full((size, size, 3), 20, np.uint8)
    masks = np.zeros((len(boxes), size, size), bool)
    for k, (y1, x1, y2, x2) in enumerate(np.asarray(boxes, int)):
        masks[k, y1:y2, x1:x2] = True
        image[y1:y2, x1:x2] = 200
    return {"image": image, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "masks": masks}


SAMPLE = scene([[5, 3, 12, 13], [14, 2, 29, 10], [20, 21, 23, 23]])  # 7x10, 15x8 and a tiny 3x2


@pytest.mark.parametrize("stride, size, pos, neg", [(8, 8, 0.7, 0.3), (8, 16, 0.5, 0.3), (4, 8, 0.6, 0.6)])
def test_labels_counts_and_uncovered_objects_agree_with_a_brute_force_labelling(stride, size, pos, neg):
    ratios = (0.5, 1.0, 2.0)
    expected, rule, best, tied = reference_labels(32, stride, size, ratios, SAMPLE["boxes"].tolist(), pos, neg)
    _, labels, _, _ = explorer.label_level(SAMPLE, size, ratios, stride, pos, neg)
    assert len(labels) == len(expected)
    # every anchor as the reference says; an anchor of a tie is positive or has the IoU rule's label
    agree = (labels == expected) | (tied & ((labels == OBJECT) | (labels == rule)))
    assert agree.all(), np.flatnonzero(~agree)
    ax = Figure().add_subplot()
    summary = explorer.draw_anchor_labels(ax, SAMPLE, size, ratios, stride, pos, neg)
    assert summary.num_anchors == len(expected)
    assert (summary.positives, summary.negatives, summary.neutrals) == (
        np.sum(labels == OBJECT), np.sum(labels == NO_OBJECT), np.sum(labels == NEUTRAL))
    np.testing.assert_allclose(summary.best_iou, best, rtol=1e-5)
    np.testing.assert_array_equal(summary.uncovered, np.flatnonzero(best < pos))
    assert len(summary.without_positive) == 0  # low-quality matches give every object a positive


def test_the_picture_holds_every_positive_and_marks_uncovered_objects():
    ax = Figure().add_subplot()
    summary = explorer.draw_anchor_labels(ax, SAMPLE, 8, (0.5, 1.0, 2.0), 8, 0.7, 0.3, max_negatives=5,
                                          max_neutrals=3)
    rectangles = [p for p in ax.patches if isinstance(p, Rectangle)]
    thick_red = [r for r in rectangles if r.get_linewidth() == 2.5]
    positives = [r for r in rectangles if r.get_linewidth() == 1.5]
    assert len(thick_red) == len(summary.uncovered) > 0  # the tiny 3x2 object at least
    assert len(positives) == summary.positives + len(SAMPLE["boxes"])  # + the objects' own boxes
    assert len(rectangles) == len(positives) + len(thick_red) + 5 + min(3, summary.neutrals)
    assert "objects without an anchor" in ax.get_title()


def test_without_low_quality_matches_small_objects_lose_their_positive():
    ax = Figure().add_subplot()
    summary = explorer.draw_anchor_labels(ax, SAMPLE, 16, (1.0,), 8, 0.7, 0.3, low_quality=False)
    assert 2 in summary.without_positive  # the 3x2 object: best IoU far below 0.7


def test_an_image_without_objects_is_all_negative():
    empty = scene(np.zeros((0, 4)))
    summary = explorer.draw_anchor_labels(Figure().add_subplot(), empty, 8, (1.0,), 8, 0.7, 0.3)
    assert summary.negatives == summary.num_anchors == 16 and summary.positives == 0
    assert len(summary.uncovered) == 0


def test_static_figure_has_one_panel_per_level():
    config = tiny_config(image_size=32)
    figure = explorer.anchor_explorer(SAMPLE, config, static=True)
    assert isinstance(figure, Figure) and len(figure.axes) == len(config.anchor_strides)
    assert figure.axes[0].get_title().startswith("P2: stride 4")


def test_without_a_widget_front_end_the_explorer_is_static(monkeypatch):
    config = tiny_config(image_size=32)
    assert not explorer.widgets_available()  # pytest is no Jupyter kernel
    assert isinstance(explorer.anchor_explorer(SAMPLE, config), Figure)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # ipywidgets not installed: import fails
    assert not explorer.widgets_available()
    assert isinstance(explorer.anchor_explorer(SAMPLE, config), Figure)
    with pytest.raises(ImportError, match="static=True"):
        explorer.anchor_explorer(SAMPLE, config, static=False)


def test_the_widget_redraws_on_every_control(capsys):
    pytest.importorskip("ipywidgets")
    config = tiny_config(image_size=32)
    view = explorer.anchor_explorer(SAMPLE, config, static=False)  # displays as text without a front end
    capsys.readouterr()
    assert view.png.startswith(b"\x89PNG") and view.state()["stride"] == config.anchor_strides[0]
    first = view.summary
    view.size.value = 16.0  # larger anchors on P2
    assert view.summary.positives != first.positives
    draws = []
    render = view.render
    view.render = lambda: draws.append(1) or render()
    view.level.value = 1  # P3: stride and size follow the level, drawn once
    assert view.state()["stride"] == config.anchor_strides[1]
    assert view.state()["scales"] == tuple(float(s) for s in config.anchor_scales[1])
    assert len(draws) == 1
    view.pos_iou.value = 0.2  # below the negative threshold: the negative one follows it down
    assert view.neg_iou.value == pytest.approx(0.2) and view.state()["neg_iou"] <= view.state()["pos_iou"]
    view.ratios.value = (1.0,)
    assert view.summary.num_anchors == (32 // 8) ** 2
