"""Tests of minimask.visualize on tiny images with the Agg backend: rectangles sit on the
pixel edges of their boxes (patch coordinates, and the rendered pixels themselves), a mask
overlay changes exactly the mask's pixels, labels, colours, empty inputs and bad inputs."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minimask.visualize import (  # noqa: E402
    PALETTE, draw_boxes, draw_instances, instance_colors, show_samples)

SCALE = 10  # screen pixels per image pixel in the rendering tests


def pixel_exact_axes(height, width):
    """A figure whose single axes fills it, SCALE screen pixels per image pixel."""
    fig = Figure(figsize=(width * SCALE / 100, height * SCALE / 100), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to the figure: render without pyplot
    ax = fig.add_axes([0, 0, 1, 1])
    return fig, ax


def render(fig):
    """The figure as uint8 RGB ``[rows, cols, 3]`` screen pixels."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_rectangle_starts_half_a_pixel_before_the_box():
    fig, ax = pixel_exact_axes(10, 12)
    draw_instances(ax, np.zeros((10, 12, 3), np.uint8), boxes=[[2, 3, 5, 7]])
    (rect,) = rectangles(ax)
    assert rect.get_xy() == (2.5, 1.5)  # (x1 - 0.5, y1 - 0.5)
    assert (rect.get_width(), rect.get_height()) == (4, 3)  # (x2 - x1, y2 - y1)
    assert ax.get_xlim() == (-0.5, 11.5) and ax.get_ylim() == (9.5, -0.5)


def test_rendered_rectangle_lies_on_the_edges_of_the_box_pixels():
    """Box (2, 3, 5, 7) covers pixel rows 2..4 and columns 3..6: its outline must run along
    screen rows 20 and 50 and screen columns 30 and 70, and nowhere through pixel centres."""
    fig, ax = pixel_exact_axes(10, 12)
    draw_boxes(ax, [[2, 3, 5, 7]], color="red", linewidth=1.0)
    ax.imshow(np.zeros((10, 12, 3), np.uint8), interpolation="nearest")
    ax.set_xlim(-0.5, 11.5)
    ax.set_ylim(9.5, -0.5)
    ax.set_axis_off()
    pixels = render(fig)
    red = (pixels[..., 0] > 100) & (pixels[..., 1] < 80)  # [rows, cols] on the outline
    rows, cols = np.nonzero(red)
    assert abs(rows.min() - 20) <= 1 and abs(rows.max() - 50) <= 1
    assert abs(cols.min() - 30) <= 1 and abs(cols.max() - 70) <= 1
    assert red[35, 29:32].any() and red[35, 69:72].any()  # left and right edges, mid-height
    assert not red[25, 35] and not red[45, 65]  # centres of pixels (2, 3) and (4, 6)


def test_mask_overlay_changes_exactly_the_mask_pixels():
    height, width = 12, 14
    image = np.full((height, width, 3), 90, np.uint8)
    mask = np.zeros((height, width), bool)
    mask[3:10, 2:9] = True
    mask[5:7, 4:6] = False  # a hole
    mask[0:2, 12:14] = True  # a second piece, touching the border

    renders = []
    for masks in (None, mask[None]):
        fig, ax = pixel_exact_axes(height, width)
        draw_instances(ax, image, masks=masks)
        renders.append(render(fig))
    before, after = renders
    # Sample the centre of every image pixel; outlines run along pixel edges, 5 screen px away.
    centres = np.arange(SCALE // 2, SCALE * max(height, width), SCALE)
    changed = np.any(before[np.ix_(centres[:height], centres[:width])]
                     != after[np.ix_(centres[:height], centres[:width])], axis=-1)  # [H, W]
    np.testing.assert_array_equal(changed, mask)
    # and the colour moved towards the palette's first colour
    target = np.array(PALETTE[0]) * 255
    inside = after[SCALE * 4 + 5, SCALE * 3 + 5].astype(float)
    assert np.abs(inside - target).sum() < np.abs(before[45, 35].astype(float) - target).sum()


def test_empty_inputs_draw_the_image_only():
    fig, ax = pixel_exact_axes(6, 7)
    draw_instances(ax, np.zeros((6, 7, 3), np.uint8), boxes=np.zeros((0, 4)),
                   class_ids=np.zeros(0, np.int32), masks=np.zeros((0, 6, 7), bool),
                   scores=np.zeros(0), class_names=["background", "a"], title="empty")
    render(fig)
    assert rectangles(ax) == [] and list(ax.texts) == []
    assert ax.get_title() == "empty"
    draw_instances(ax, np.zeros((6, 7), np.uint8), boxes=[], masks=[])  # grayscale, plain lists
    assert draw_boxes(ax, np.zeros((0, 4)), "red", labels=[]) == []


def test_mismatched_inputs_raise():
    image = np.zeros((6, 7, 3), np.uint8)
    fig, ax = pixel_exact_axes(6, 7)
    with pytest.raises(ValueError, match="different lengths"):
        draw_instances(ax, image, boxes=np.zeros((2, 4)), class_ids=[1])
    with pytest.raises(ValueError, match="different lengths"):
        draw_instances(ax, image, boxes=np.zeros((2, 4)), masks=np.zeros((3, 6, 7), bool))
    with pytest.raises(ValueError, match="different lengths"):
        draw_instances(ax, image, class_ids=[1, 2], scores=[0.5], masks=np.zeros((2, 6, 7)))
    with pytest.raises(ValueError, match=r"masks must be \[N, 6, 7\]"):
        draw_instances(ax, image, masks=np.zeros((1, 7, 6), bool))
    with pytest.raises(ValueError, match="colours"):
        draw_instances(ax, image, boxes=np.zeros((2, 4)), colors=["red", "blue", "green"])
    with pytest.raises(ValueError, match="need boxes or masks"):
        draw_instances(ax, image, class_ids=[1])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        draw_boxes(ax, np.zeros((2, 3)), "red")
    with pytest.raises(ValueError, match="labels"):
        draw_boxes(ax, np.zeros((2, 4)), "red", labels=["one"])


def test_labels_say_name_and_score():
    fig, ax = pixel_exact_axes(10, 10)
    boxes = [[1, 1, 4, 4], [5, 5, 9, 9]]
    draw_instances(ax, np.zeros((10, 10, 3), np.uint8), boxes=boxes, class_ids=[2, 1],
                   scores=[0.934, 0.5], class_names=["background", "cat", "dog"])
    assert [t.get_text() for t in ax.texts] == ["dog 0.93", "cat 0.50"]
    assert ax.texts[0].get_position() == (0.5, 0.5)  # at the rectangle's corner
    fig, ax = pixel_exact_axes(10, 10)
    draw_instances(ax, np.zeros((10, 10, 3), np.uint8), boxes=boxes, class_ids=[2, 1])
    assert [t.get_text() for t in ax.texts] == ["2", "1"]
    fig, ax = pixel_exact_axes(10, 10)
    draw_instances(ax, np.zeros((10, 10, 3), np.uint8), boxes=boxes, class_ids=[2, 1],
                   show_labels=False)
    assert list(ax.texts) == []


def test_colours_are_distinct_fixed_and_per_instance():
    assert len(set(instance_colors(len(PALETTE)))) == len(PALETTE)
    assert instance_colors(25)[20:] == instance_colors(5)  # cycles
    edges = []
    for _ in range(2):
        fig, ax = pixel_exact_axes(10, 10)
        draw_instances(ax, np.zeros((10, 10, 3), np.uint8), boxes=[[0, 0, 2, 2], [3, 3, 6, 6]])
        edges.append([tuple(r.get_edgecolor()) for r in rectangles(ax)])
    assert edges[0] == edges[1]
    assert edges[0][0] != edges[0][1]
    fig, ax = pixel_exact_axes(10, 10)
    rects = draw_boxes(ax, [[0, 0, 2, 2], [3, 3, 6, 6]], ["red", "blue"], linestyle="--")
    assert [r.get_linestyle() for r in rects] == ["--", "--"]
    assert [tuple(r.get_edgecolor()) for r in rects] == [(1, 0, 0, 1), (0, 0, 1, 1)]


def test_show_samples_grid_uses_only_the_valid_rows():
    rng = np.random.default_rng(0)

    def sample(n, padded_to=None, image_id=None):
        masks = np.zeros((n, 8, 8), bool)
        for k in range(n):
            masks[k, k:k + 2, k:k + 3] = True
        s = {"image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
             "boxes": np.array([[k, k, k + 2, k + 3] for k in range(n)], np.float32).reshape(-1, 4),
             "class_ids": np.arange(1, n + 1, dtype=np.int32), "masks": masks}
        if padded_to is not None:  # as in a padded batch: extra rows are meaningless
            s = {key: np.concatenate([v, np.ones((padded_to - n,) + v.shape[1:], v.dtype)])
                 for key, v in s.items() if key != "image"} | {"image": s["image"]}
            s["num_instances"] = n
        if image_id is not None:
            s["image_id"] = image_id
        s["ignore_boxes"] = np.array([[0, 0, 8, 8]], np.float32)
        return s

    samples = [sample(2, image_id=7), sample(0), sample(1, padded_to=3), sample(3),
               sample(2)]
    names = ["background"] + [str(d) for d in range(10)]
    fig = show_samples(samples, names, ncols=3, size=1)
    axes = fig.axes
    assert len(axes) == 6  # 2 rows x 3 columns, the last one empty
    # one rectangle per valid instance, plus the dashed crowd box
    assert [len(rectangles(ax)) for ax in axes] == [3, 1, 2, 4, 3, 0]
    assert axes[0].get_title() == "image 7"
    assert [t.get_text() for t in axes[2].texts] == ["0"]
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one"):
        show_samples([], names)
