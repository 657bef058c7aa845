"""Tests of minimask.roi_align against a numpy loop written for reading, hand-worked cases,
finite differences, and tf.image.crop_and_resize."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.roi_align import (
    IMPLEMENTATIONS,
    TALK_GRID_8x8,
    MultiLevelRoIAlign,
    assign_levels,
    multilevel_roi_align,
    roi_align,
    roi_pool,
)

# ---------------------------------------------------------------------------
# Independent references: plain loops over RoIs, bins and samples.
# ---------------------------------------------------------------------------


def bilinear_reference(fmap, y, x):
    """Value of ``fmap [H, W, C]`` at (y, x) in the cell-centre frame, following the
    torchvision CPU kernel line by line (scalar code)."""
    height, width = fmap.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high]
            + ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def roi_align_reference(features, boxes, box_indices, output_size, spatial_scale,
                        sampling_ratio, aligned):
    features = np.asarray(features, np.float64)
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, features.shape[3]))
    shift = 0.5 if aligned else 0.0
    for r, (box, b) in enumerate(zip(boxes, box_indices)):
        y1, x1, y2, x2 = np.asarray(box, np.float64) * spatial_scale
        top, left = y1 - shift, x1 - shift
        roi_h, roi_w = y2 - y1, x2 - x1
        if not aligned:
            roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        for ph in range(oh):
            for pw in range(ow):
                total = np.zeros(features.shape[3])
                for iy in range(sampling_ratio):
                    y = top + ph * bin_h + (iy + 0.5) * bin_h / sampling_ratio
                    for ix in range(sampling_ratio):
                        x = left + pw * bin_w + (ix + 0.5) * bin_w / sampling_ratio
                        total += bilinear_reference(features[b], y, x)
                out[r, ph, pw] = total / sampling_ratio**2
    return out


def roi_pool_reference(features, boxes, box_indices, output_size, spatial_scale):
    """torchvision's roi_pool loop, with minimask's exclusive box end (no ``+ 1``)."""
    features = np.asarray(features, np.float64)
    height, width = features.shape[1:3]
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, features.shape[3]))

    def c_round(v):  # C's round(): half away from zero
        return int(np.sign(v) * np.floor(abs(v) + 0.5))

    for r, (box, b) in enumerate(zip(boxes, box_indices)):
        y1, x1, y2, x2 = [c_round(v * spatial_scale) for v in box]
        roi_h, roi_w = max(y2 - y1, 1), max(x2 - x1, 1)
        for ph in range(oh):
            h0 = min(max(y1 + int(np.floor(ph * roi_h / oh)), 0), height)
            h1 = min(max(y1 + int(np.ceil((ph + 1) * roi_h / oh)), 0), height)
            for pw in range(ow):
                w0 = min(max(x1 + int(np.floor(pw * roi_w / ow)), 0), width)
                w1 = min(max(x1 + int(np.ceil((pw + 1) * roi_w / ow)), 0), width)
                if h1 > h0 and w1 > w0:
                    out[r, ph, pw] = features[b, h0:h1, w0:w1].max(axis=(0, 1))
    return out


def random_boxes(rng, count, image_size):
    """Boxes in image pixels: some inside, some partly outside the image, some smaller
    than one feature cell, and two degenerate (zero size)."""
    centre = rng.uniform(-0.2 * image_size, 1.2 * image_size, size=(count, 2))
    size = np.exp(rng.uniform(np.log(0.5), np.log(image_size), size=(count, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    boxes[:2, 2:] = boxes[:2, :2]  # zero height and width
    return boxes.astype(np.float32)


# ---------------------------------------------------------------------------
# RoIAlign against the reference
# ---------------------------------------------------------------------------

LARGEST_DIFFERENCE = []  # filled by the test below; printed with `pytest -s`


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio, output_size", [(1, (7, 7)), (2, (7, 7)), (2, (3, 5)),
                                                         (3, (4, 4)), (4, (1, 2))])
def test_roi_align_matches_reference(aligned, sampling_ratio, output_size, implementation):
    rng = np.random.default_rng(sampling_ratio * 10 + output_size[1])
    stride = 4
    features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)  # image 36 x 44 pixels
    boxes = random_boxes(rng, 40, image_size=40)
    box_indices = rng.integers(0, 2, size=40).astype(np.int32)
    got = roi_align(features, boxes, box_indices, output_size, 1 / stride,
                    sampling_ratio=sampling_ratio, aligned=aligned,
                    implementation=implementation).numpy()
    want = roi_align_reference(features, boxes, box_indices, output_size, 1 / stride,
                               sampling_ratio, aligned)
    difference = np.abs(got - want).max()
    LARGEST_DIFFERENCE.append(difference)
    print(f"{implementation} aligned={aligned} s={sampling_ratio} out={output_size}: "
          f"max |diff| = {difference:.2e}")
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_hand_worked_arange_5x5():
    """The 5x5 map 0..24: value(y, x) = 5 y + x at cell centres.  Bilinear interpolation
    reproduces a linear function exactly and the mean of a bin's regular samples is the bin
    centre, so every output is 5 y_c + x_c at its bin centre (as long as nothing is clamped)."""
    features = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    box = [[1.0, 1.0, 3.0, 3.0]]  # a 2x2 RoI, 4x4 bins of half a cell
    # aligned=False: bin centres y_c = 1 + 0.25 + 0.5 i = 1.25, 1.75, 2.25, 2.75 (same for x);
    # bin (0, 0) = 5 * 1.25 + 1.25 = 7.5
    not_aligned = [[7.5, 8.0, 8.5, 9.0],
                   [10.0, 10.5, 11.0, 11.5],
                   [12.5, 13.0, 13.5, 14.0],
                   [15.0, 15.5, 16.0, 16.5]]
    # aligned=True shifts every centre by -0.5: 0.75, 1.25, ...; bin (0, 0) = 5 * 0.75 + 0.75 = 4.5
    aligned = [[4.5, 5.0, 5.5, 6.0],
               [7.0, 7.5, 8.0, 8.5],
               [9.5, 10.0, 10.5, 11.0],
               [12.0, 12.5, 13.0, 13.5]]
    for flag, want in [(False, not_aligned), (True, aligned)]:
        for sampling_ratio in (1, 2, 3):
            got = roi_align(features, box, [0], 4, 1.0, sampling_ratio, aligned=flag)
            np.testing.assert_allclose(got.numpy()[0, :, :, 0], want, atol=1e-5)

    # At the border the clamp shows: the cell (0, 0) as a box, one bin, 2x2 samples.
    # aligned=True: samples at -0.25 and +0.25 on each axis; -0.25 is clamped to 0, so the
    # samples are (0, 0), (0, .25), (.25, 0), (.25, .25) -> 0, 0.25, 1.25, 1.5 -> mean 0.75.
    got = roi_align(features, [[0.0, 0.0, 1.0, 1.0]], [0], 1, 1.0, 2, aligned=True)
    np.testing.assert_allclose(got.numpy().ravel(), [0.75], atol=1e-6)
    # aligned=False: samples at 0.25 and 0.75 -> mean = value at (0.5, 0.5) = 3.0.
    got = roi_align(features, [[0.0, 0.0, 1.0, 1.0]], [0], 1, 1.0, 2, aligned=False)
    np.testing.assert_allclose(got.numpy().ravel(), [3.0], atol=1e-6)


def test_talk_8x8_example():
    """The talk's RoI-pooling slide: 8x8 map, 2x2 output.  The RoI (3.4, 0.2, 8.2, 6.6) snaps
    (round) to rows 3..7 and columns 0..6, the region of the classic illustration."""
    features = TALK_GRID_8x8[None, :, :, None]
    box = [[3.4, 0.2, 8.2, 6.6]]

    # RoIPool: snapped size 5 x 7; row bins floor/ceil(0, 2.5) = rows 3..5 and
    # floor/ceil(2.5, 5) = rows 5..7 (row 5 is in both); column bins 0..3 and 3..6.
    #   top-left  = max(rows 3-5, cols 0-3) = 0.85 (row 3, col 0)
    #   top-right = max(rows 3-5, cols 3-6) = 0.96 (row 5, col 6)
    #   bottom    = 0.97 (row 7, col 2) and 0.96 (row 5, col 6)
    # (The illustration splits 5 rows as 2 + 3 instead, which gives 0.84 top-right.)
    pooled = roi_pool(features, box, [0], 2, 1.0).numpy()[0, :, :, 0]
    np.testing.assert_allclose(pooled, [[0.85, 0.96], [0.97, 0.96]], atol=1e-6)

    # RoIAlign, aligned=True, 2x2 samples per bin.  The RoI in the cell-centre frame starts at
    # (3.4 - 0.5, 0.2 - 0.5) = (2.9, -0.3) and is 4.8 x 6.4: bins 2.4 x 3.2, samples every
    # 1.2 rows and 1.6 columns.  Sample rows 3.5, 4.7 | 5.9, 7.1; columns 0.5, 2.1 | 3.7, 5.3.
    # Bin (0, 0):
    #   (3.5, 0.5): rows 3,4 x cols 0,1, all weights 1/4: (.85+.34+.32+.74)/4         = 0.5625
    #   (3.5, 2.1): row 3: .9*.76+.1*.84 = .768; row 4: .9*.21+.1*.39 = .228; mean    = 0.4980
    #   (4.7, 0.5): row 4: (.32+.74)/2 = .53; row 5: (.20+.14)/2 = .17; .3*.53+.7*.17 = 0.2780
    #   (4.7, 2.1): row 4: .228; row 5: .9*.16+.1*.13 = .157; .3*.228+.7*.157         = 0.1783
    #   mean of the four = 1.5168 / 4 = 0.3792
    # The other bins the same way (checked with roi_align_reference):
    aligned = roi_align(features, box, [0], 2, 1.0, 2, aligned=True).numpy()[0, :, :, 0]
    np.testing.assert_allclose(aligned, [[0.3792, 0.46702], [0.49775, 0.384425]], atol=1e-5)
    # aligned=False: the same sampling grid half a cell further down-right.
    not_aligned = roi_align(features, box, [0], 2, 1.0, 2, aligned=False).numpy()[0, :, :, 0]
    np.testing.assert_allclose(not_aligned, [[0.383, 0.4964], [0.4145, 0.3672]], atol=1e-5)
    for flag, got in [(True, aligned), (False, not_aligned)]:
        want = roi_align_reference(features, box, [0], (2, 2), 1.0, 2, flag)[0, :, :, 0]
        np.testing.assert_allclose(got, want, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.5, 9.5), min_size=4, max_size=4),
    st.integers(1, 4),
    st.integers(1, 5),
    st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3)),
)
def test_linear_map_gives_bin_centres(coords, sampling_ratio, bins, plane):
    """Property: on a linear map a*y + b*x + c, a RoI whose samples stay inside the map gets
    exactly the map's value at its bin centres (bilinear interpolation is exact on planes)."""
    y1, y2 = sorted(coords[:2])
    x1, x2 = sorted(coords[2:])
    a, b, c = plane
    rows, cols = np.meshgrid(np.arange(10.0), np.arange(10.0), indexing="ij")
    features = (a * rows + b * cols + c).astype(np.float32)[None, :, :, None]
    got = roi_align(features, [[y1, x1, y2, x2]], [0], bins, 1.0, sampling_ratio).numpy()
    centre_y = y1 - 0.5 + (np.arange(bins) + 0.5) * (y2 - y1) / bins
    centre_x = x1 - 0.5 + (np.arange(bins) + 0.5) * (x2 - x1) / bins
    want = a * centre_y[:, None] + b * centre_x[None, :] + c
    np.testing.assert_allclose(got[0, :, :, 0], want, atol=1e-4)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 4, 5, 2))  # float64 for a clean numerical Jacobian
    boxes = np.array([[1.0, 2.0, 11.0, 17.0], [-3.0, -2.0, 6.0, 5.0], [7.0, 9.0, 8.0, 10.0]],
                     np.float32)  # inside, partly outside, smaller than a cell (stride 4)

    def pool(f):
        return roi_align(f, boxes, [0, 1, 1], (2, 3), 0.25, sampling_ratio=2)

    theoretical, numerical = tf.test.compute_gradient(pool, [tf.constant(features)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.abs(theoretical[0]).sum() > 0  # the test can fail: gradients are not all zero

    # The crop_and_resize implementation has its own (fused) gradient: the same numbers.
    features = tf.constant(features, tf.float32)
    weights = rng.normal(size=(3, 2, 3, 2))
    grads = []
    for implementation in IMPLEMENTATIONS:
        with tf.GradientTape() as tape:
            tape.watch(features)
            out = roi_align(features, boxes, [0, 1, 1], (2, 3), 0.25, 2,
                            implementation=implementation)
            loss = tf.reduce_sum(out * weights)
        grads.append(tape.gradient(loss, features).numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


def test_bad_arguments_raise():
    features = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(features, [[0.0, 0.0, 2.0, 2.0]], [0], 2, 1.0, sampling_ratio=0)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(features, [0.0, 0.0, 2.0, 2.0], [0], 2, 1.0)
    with pytest.raises(ValueError, match="features"):
        roi_align(features[0], [[0.0, 0.0, 2.0, 2.0]], [0], 2, 1.0)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, [[0.0, 0.0, 2.0, 2.0]], [0], (0, 2), 1.0)
    with pytest.raises(ValueError, match="implementation"):
        roi_align(features, [[0.0, 0.0, 2.0, 2.0]], [0], 2, 1.0, implementation="fast")


# ---------------------------------------------------------------------------
# RoIPool
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("output_size", [(2, 2), (3, 5), (7, 7)])
def test_roi_pool_matches_reference(output_size):
    rng = np.random.default_rng(output_size[1])
    features = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    boxes = random_boxes(rng, 40, image_size=40)
    boxes[2] = [8.0, 10.0, 18.0, 30.0]  # two exact halves (x.5 * 0.25 rounding cases)
    box_indices = rng.integers(0, 2, size=40).astype(np.int32)
    got = roi_pool(features, boxes, box_indices, output_size, 0.25).numpy()
    want = roi_pool_reference(features, boxes, box_indices, output_size, 0.25)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (want == 0).any() and (want != 0).any()  # some empty (off-map) bins, some not


# ---------------------------------------------------------------------------
# crop_and_resize, exactly and naively
# ---------------------------------------------------------------------------


def test_crop_and_resize_equals_roi_align_with_one_sample():
    """roi_align(sampling_ratio=1, aligned=True) samples the bin centres, from
    top + bin/2 to top + h - bin/2 in the cell-centre frame; crop_and_resize samples a
    grid from its (normalised) box's first edge to its last.  Same grid -> same values."""
    rng = np.random.default_rng(0)
    height, width, stride = 12, 10, 8
    features = rng.normal(size=(2, height, width, 4)).astype(np.float32)
    # Boxes whose samples stay inside [0, H-1] x [0, W-1] (crop_and_resize pads outside
    # with 0 where roi_align clamps): corners within cells [1, H-1].
    corners = rng.uniform(1.0, [height - 1, width - 1], size=(30, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1) * stride
    boxes = boxes.astype(np.float32)
    box_indices = rng.integers(0, 2, size=30).astype(np.int32)
    for out_h, out_w in [(7, 7), (3, 5), (1, 4)]:
        want = roi_align(features, boxes, box_indices, (out_h, out_w), 1 / stride, 1, True)
        cells = boxes / stride - 0.5  # cell-centre frame: (top, left, bottom, right)
        half_bin = (cells[:, 2:] - cells[:, :2]) / np.array([out_h, out_w]) / 2
        first = cells[:, :2] + half_bin  # first sample (y, x)
        last = cells[:, 2:] - half_bin  # last sample (y, x)
        normalised = np.concatenate([first, last], axis=1) / np.array(
            [height - 1, width - 1, height - 1, width - 1])
        got = tf.image.crop_and_resize(features, normalised.astype(np.float32), box_indices,
                                       (out_h, out_w))
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("sampling_ratio, output_size", [(1, (7, 7)), (2, (7, 7)), (3, (3, 5))])
def test_crop_and_resize_on_edge_padded_map_equals_roi_align_everywhere(sampling_ratio,
                                                                        output_size):
    """Pad the map with one copy of its border cells: cell-centre coordinate y becomes y + 1,
    samples in [-1, H] read the border (RoIAlign's clamp) and samples beyond fall off the
    padded map, where crop_and_resize returns 0 (RoIAlign's zero).  Then any box works, and
    a (s*oh, s*ow) crop average-pooled s x s gives sampling_ratio s."""
    rng = np.random.default_rng(sampling_ratio)
    height, width, stride = 9, 11, 4
    features = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    boxes = random_boxes(rng, 60, image_size=44)  # partly outside, tiny, degenerate
    box_indices = rng.integers(0, 2, size=60).astype(np.int32)
    want = roi_align(features, boxes, box_indices, output_size, 1 / stride, sampling_ratio, True)

    padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    cells = boxes / stride - 0.5 + 1.0  # cell-centre frame of the padded map
    grid = np.array(output_size) * sampling_ratio
    half_step = (cells[:, 2:] - cells[:, :2]) / grid / 2
    normalised = np.concatenate([cells[:, :2] + half_step, cells[:, 2:] - half_step], axis=1)
    normalised /= np.array([height + 1, width + 1, height + 1, width + 1])  # padded size - 1
    crops = tf.image.crop_and_resize(padded, normalised.astype(np.float32), box_indices, grid)
    got = tf.nn.avg_pool2d(crops, sampling_ratio, sampling_ratio, "VALID")
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5)


def naive_crop_and_resize_difference(seed=0):
    """Mean and max |naive - roi_align| over 7x7 bins of 200 random RoIs on N(0, 1) features,
    and the std of the roi_align outputs, for the shortcut
    ``avg_pool2x2(crop_and_resize(box * scale / (H-1, W-1), 14x14))``."""
    rng = np.random.default_rng(seed)
    height = width = 16
    features = rng.normal(size=(2, height, width, 8)).astype(np.float32)
    top_left = rng.uniform(0, 4, size=(200, 2))
    size = rng.uniform(2, 12, size=(200, 2))
    cells = np.concatenate([top_left, top_left + size], axis=1).astype(np.float32)
    box_indices = rng.integers(0, 2, size=200).astype(np.int32)
    exact = roi_align(features, cells, box_indices, 7, 1.0, 2, True).numpy()
    crops = tf.image.crop_and_resize(features, cells / (height - 1), box_indices, (14, 14))
    naive = tf.nn.avg_pool2d(crops, 2, 2, "VALID").numpy()
    difference = np.abs(naive - exact)
    return difference.mean(), difference.max(), exact.std()


def test_naive_crop_and_resize_differs():
    mean, largest, spread = naive_crop_and_resize_difference()
    print(f"naive crop_and_resize vs roi_align: mean |diff| {mean:.3f}, max {largest:.3f}, "
          f"output std {spread:.3f}")
    # A systematic misalignment, far above float rounding (see the module docstring).
    assert mean > 0.1 and largest > 0.5


# ---------------------------------------------------------------------------
# Levels and the pyramid
# ---------------------------------------------------------------------------


def test_assign_levels_follows_fpn_equation_1():
    # sqrt(area) = 224 -> level 4; halve the size -> one level down; clamp at both ends.
    boxes = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111.9, 111.9],
                      [0, 0, 448, 448], [0, 0, 1000, 1000], [0, 0, 2, 2], [5, 5, 5, 5]],
                     np.float32)
    levels = assign_levels(boxes).numpy()
    np.testing.assert_array_equal(levels, [4, 3, 2, 5, 5, 2, 2])
    # A small canonical size for small objects: a 28 px digit pools from level 3 with s0 = 32.
    levels = assign_levels([[0, 0, 28, 28], [0, 0, 32, 32]], canonical_size=32.0).numpy()
    np.testing.assert_array_equal(levels, [3, 4])
    with pytest.raises(ValueError):
        assign_levels(boxes, min_level=5, max_level=2)


def pyramid(rng, batch=2, image=64, channels=3):
    """Random P2..P5 maps of a ``image x image`` input."""
    return [rng.normal(size=(batch, image // 2**k, image // 2**k, channels)).astype(np.float32)
            for k in range(2, 6)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_multilevel_matches_per_level_roi_align(implementation):
    rng = np.random.default_rng(5)
    features = pyramid(rng)
    boxes = random_boxes(rng, 2 * 30, image_size=64).reshape(2, 30, 4)
    got = multilevel_roi_align(features, boxes, (5, 4), sampling_ratio=2, canonical_size=32.0,
                               implementation=implementation).numpy()
    levels = assign_levels(boxes, 2, 5, canonical_size=32.0).numpy()
    assert len(np.unique(levels)) >= 3  # the test exercises several levels
    for level in range(2, 6):
        image, roi = np.nonzero(levels == level)
        want = roi_align(features[level - 2], boxes[image, roi], image.astype(np.int32), (5, 4),
                         2.0**-level, 2).numpy()
        np.testing.assert_allclose(got[image, roi], want, atol=2e-5)


def test_multilevel_layer_round_trip_and_gradient():
    rng = np.random.default_rng(6)
    features = [tf.constant(f) for f in pyramid(rng)]
    boxes = random_boxes(rng, 2 * 8, image_size=64).reshape(2, 8, 4)
    layer = MultiLevelRoIAlign(output_size=(3, 3), canonical_size=32.0,
                               implementation="crop_and_resize", name="pool")
    with tf.GradientTape() as tape:
        tape.watch(features)
        out = layer(features, boxes)
        loss = tf.reduce_sum(out * rng.normal(size=out.shape))
    assert out.shape == (2, 8, 3, 3, 3)
    grads = tape.gradient(loss, features)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)

    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert clone.get_config() == layer.get_config()
    np.testing.assert_allclose(clone(features, boxes).numpy(), out.numpy())

    # Inside tf.function with the batch and RoI counts unknown at trace time.
    spec = [tf.TensorSpec([None, None, None, 3])] * 4
    traced = tf.function(lambda f, b: layer(f, b),
                         input_signature=[spec, tf.TensorSpec([None, None, 4])])
    np.testing.assert_allclose(traced(features, boxes).numpy(), out.numpy(), atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_rois(implementation):
    features = np.ones((2, 8, 8, 3), np.float32)
    no_boxes, no_indices = np.zeros((0, 4), np.float32), np.zeros(0, np.int32)
    pooled = roi_align(features, no_boxes, no_indices, 7, 0.25, implementation=implementation)
    assert pooled.shape == (0, 7, 7, 3)
    assert roi_pool(features, no_boxes, no_indices, 7, 0.25).shape == (0, 7, 7, 3)
    pooled = multilevel_roi_align([features, features[:, :4, :4]], np.zeros((2, 0, 4)), 7,
                                  implementation=implementation)
    assert pooled.shape == (2, 0, 7, 7, 3)
