"""RoIAlign and RoIPool: a fixed-size feature grid for every region of interest.

The box head and the mask head need one feature tensor of a fixed size (7x7 or 14x14)
per RoI, whatever the RoI's size.  Two ways to cut it out of the feature map:

RoIPool (Fast R-CNN, Girshick 2015, Sec. 2.1)
    snaps the RoI to the feature grid (``round``), divides it into bins with ``floor``
    and ``ceil``, and takes the max of each bin.  The two roundings misalign the
    pooled features with the RoI by up to a cell (a stride of 32 image pixels on C5),
    harmless for classification but ruinous for pixel-accurate masks.
RoIAlign (Mask R-CNN, He et al. 2017, Sec. 3, "RoIAlign")
    keeps the RoI's exact coordinates, samples ``sampling_ratio x sampling_ratio``
    regularly spaced points in each bin by bilinear interpolation of the four
    nearest cells, and averages them.  No rounding anywhere, and the output is a
    differentiable (piecewise linear) function of the features.

With a feature pyramid each RoI is pooled from one level chosen by its size
(FPN, Lin et al. 2017, Eqn. 1): :func:`assign_levels` and :func:`multilevel_roi_align`.

Coordinate frames
-----------------
Boxes come in *image pixels* (the minimask convention: ``(y1, x1, y2, x2)``,
continuous, pixel ``i`` covers ``[i, i+1)``).  A feature map of stride ``s`` is
reached with ``spatial_scale = 1 / s``: ``box * spatial_scale`` is the box in
continuous *feature-cell* coordinates (cell ``i`` covers ``[i, i+1)``, its centre is
at ``i + 0.5``).  Bilinear interpolation, however, indexes the cell *centres*
(value ``F[i]`` sits at ``i``), so the exact conversion subtracts half a cell:

* ``aligned=True``: ``box * spatial_scale - 0.5``.  Detectron2's ROIAlignV2 and
  torchvision's ``roi_align(..., aligned=True)``; the default here.
* ``aligned=False``: ``box * spatial_scale`` with no shift, and the RoI's height and
  width forced to at least one cell: the original Mask R-CNN / Detectron definition.
  It samples half a cell down-right of where the box is.

Sampling points outside the map (boxes that stick out of the image, or the
``-0.5`` shift at the border) follow torchvision and Detectron2 exactly: a sample with
``y < -1`` or ``y > H`` (or ``x < -1`` or ``x > W``) contributes 0 to its bin's average;
any other sample first has its coordinates clamped to ``[0, H-1] x [0, W-1]``
(so a sample between the border and one cell beyond it repeats the border value).
The average always divides by ``sampling_ratio ** 2``, counting the zero samples.

Relation to ``tf.image.crop_and_resize`` (the op matterport's Keras Mask R-CNN uses)
------------------------------------------------------------------------------------
``crop_and_resize(F, [b / (H-1, W-1, H-1, W-1)], ..., crop_size=(n, n))``, for a box
``b = (p1, q1, p2, q2)`` in the cell-centre frame, takes one bilinear sample per output at the
``n`` evenly spaced rows ``p1 + i (p2 - p1) / (n - 1)`` (the centre if ``n == 1``): a grid that
*includes the box edges*, no averaging, and 0 outside ``[0, H-1]``.  RoIAlign with
``sampling_ratio=1`` samples the bin centres ``t + (i + 0.5) h / n``, with ``t = y1 * scale - 0.5``
and ``h`` the RoI height: ``n`` evenly spaced rows from ``t + h / (2n)`` to ``t + h - h / (2n)``.
Hence, exactly (tested to 1e-5 for RoIs whose samples stay inside the map):

    roi_align(F, box, sampling_ratio=1, aligned=True)
      == crop_and_resize(F, b / (H-1, W-1, H-1, W-1)) with
         b = (box * scale - 0.5) shrunk by half a bin on each side

Edge-padding ``F`` by one cell (``tf.pad(..., mode="SYMMETRIC")``) and shifting the boxes by
one cell turns the out-of-map rule into crop_and_resize's own (0 outside the padded map,
border value within one cell of it), and then the equality holds for every box and, with a
``s x s`` finer grid and an ``s x s`` average pool, for any ``sampling_ratio`` (tested too).

The usual shortcut, ``crop_and_resize`` of ``box * scale / (H-1)`` to ``2n x 2n`` followed by
a 2x2 average pool, misses the half-cell shift and stretches the grid to the box edges.
On random features (N(0, 1), 8 channels, RoIs of 2-12 cells, 7x7 output) its outputs differ from
``roi_align(..., sampling_ratio=2, aligned=True)`` by 0.40 on average and up to 2.9, while the
outputs themselves have a std of 0.57: a systematic misalignment, not rounding noise (measured by
``tests/test_roi_align.py::test_naive_crop_and_resize_differs``).

Two implementations, equal to float rounding (tested), chosen with ``implementation=``:

``"gather"`` (the default; the one to read)
    every sampling point of every RoI becomes four flat row indices into the features
    reshaped to a table ``[B*H*W, C]`` and four weights; one ``tf.gather`` fetches all of
    them and a batched matmul applies the weights and averages each bin.  No Python loop
    over RoIs; the gradient w.r.t. the features is the gather's (a scatter-add of the
    weighted output gradient).  It materialises ``4 s^2`` feature rows per output bin,
    which makes it memory-bound: on 1,000 RoIs of an FPN (``bench/bench_roi_align.py``,
    2 CPU cores) it takes ~2x the time of ``"crop_and_resize"`` forward, ~5x with the gradient.
    On a single map (:func:`roi_align`) the same interpolation runs one axis after the other
    (:func:`_separable_pool`: whole map rows are gathered, then the RoI's columns of them),
    ~3x faster on the single-channel masks that the mask targets are cut from.
``"crop_and_resize"`` (for training speed)
    the edge-padding relation above: ``tf.image.crop_and_resize``, a fused C++ kernel with
    a fused gradient, samples the ``s x s`` finer grid, samples farther than one cell off
    the map are zeroed, and an ``s x s`` average pool makes the bins.

Boxes are treated as constants (``tf.stop_gradient``), as in Mask R-CNN where proposals
are not back-propagated.
"""
import keras
import numpy as np
import tensorflow as tf

from minimask.boxes import area

# The 8x8 feature map of the talk's "RoI-Pooling" slides
# (/work/shared/reference/mask_rcnn_talk_2018.txt), row by row.
TALK_GRID_8x8 = np.array(
    [
        [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
        [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
        [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
        [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
        [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
        [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
        [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
        [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
    ],
    dtype=np.float32,
)
TALK_GRID_8x8.flags.writeable = False  # a shared constant: lessons must copy before editing

# Added inside log2 so that an empty box (size 0) gets a finite, very low level instead
# of log2(0) = -inf (Detectron2's ROIPooler uses the same 1e-8).
LEVEL_EPSILON = 1e-8


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _output_pair(output_size):
    """``7`` or ``(7, 7)`` -> ``(7, 7)``; both must be positive ints."""
    if isinstance(output_size, (int, np.integer)):
        output_size = (int(output_size), int(output_size))
    output_size = tuple(int(v) for v in output_size)
    if len(output_size) != 2 or min(output_size) < 1:
        raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size}")
    return output_size


def _check_sampling_ratio(sampling_ratio):
    if int(sampling_ratio) != sampling_ratio or sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be a positive int, got {sampling_ratio!r}: the adaptive mode "
            "(sampling_ratio <= 0, ceil(roi_size / output_size) samples per bin) gives every RoI "
            "a different number of samples, which static shapes cannot express"
        )
    return int(sampling_ratio)


IMPLEMENTATIONS = ("gather", "crop_and_resize")


def _check_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def _check_boxes(boxes, box_indices):
    boxes = tf.stop_gradient(tf.convert_to_tensor(boxes, tf.float32))
    box_indices = tf.convert_to_tensor(box_indices, tf.int32)
    if boxes.shape.rank != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [R, 4] (y1, x1, y2, x2), got {boxes.shape}")
    if box_indices.shape.rank != 1:
        raise ValueError(f"box_indices must have shape [R], got {box_indices.shape}")
    return boxes, box_indices


def _check_features(features):
    features = tf.convert_to_tensor(features)
    if features.shape.rank != 4:
        raise ValueError(f"features must have shape [B, H, W, C], got {features.shape}")
    return features


# ---------------------------------------------------------------------------
# RoIAlign: the pieces
# ---------------------------------------------------------------------------


def _roi_in_cells(boxes, spatial_scale, aligned):
    """Boxes ``[R, 4]`` in image pixels -> (top, left, height, width), each ``[R]``, in the
    cell-centre frame of the feature map (cell ``i``'s value sits at ``i``).

    ``spatial_scale`` is a Python float or a ``[R]`` tensor (one scale per RoI).
    """
    scale = tf.cast(spatial_scale, tf.float32)
    shift = 0.5 if aligned else 0.0  # continuous cell coordinates -> cell-centre coordinates
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    top, left = y1 * scale - shift, x1 * scale - shift
    height, width = (y2 - y1) * scale, (x2 - x1) * scale
    if not aligned:
        # Original RoIAlign: a malformed or tiny RoI is forced to one cell.
        height, width = tf.maximum(height, 1.0), tf.maximum(width, 1.0)
    return top, left, height, width


def _sample_positions(start, size, bins, sampling_ratio):
    """Sampling coordinates along one axis: ``start, size [R]`` -> ``[R, bins * sampling_ratio]``.

    Sample ``k`` lies in bin ``k // s`` at sub-position ``k % s``, so its distance from the
    RoI start, in bins, is ``k // s + (k % s + 0.5) / s = (k + 0.5) / s``.
    """
    s = sampling_ratio
    k = tf.range(bins * s, dtype=tf.float32)
    bin_size = size / bins  # [R]
    return start[:, None] + ((k + 0.5) / s)[None, :] * bin_size[:, None]


def _linear_taps(coords, length):
    """1-D linear interpolation taps: ``coords [R, N]``, ``length [R, 1]`` (cells on this axis)
    -> ``low, high`` int32 ``[R, N]`` (the two neighbouring cells) and their float weights.

    Follows torchvision/Detectron2: outside ``[-1, length]`` both weights are 0; otherwise the
    coordinate is clamped to ``[0, length - 1]`` (at the last cell ``low == high``).
    """
    inside = tf.cast((coords >= -1.0) & (coords <= length), tf.float32)
    clamped = tf.minimum(tf.maximum(coords, 0.0), length - 1.0)
    low = tf.floor(clamped)
    high = tf.minimum(low + 1.0, length - 1.0)
    frac = clamped - low  # distance from the low cell, in [0, 1)
    return tf.cast(low, tf.int32), tf.cast(high, tf.int32), (1.0 - frac) * inside, frac * inside


def _bilinear_pool(table, first_row, height, width, top, left, roi_h, roi_w, output_size,
                   sampling_ratio):
    """The RoIAlign kernel on a flat feature table.

    ``table [N, C]`` holds feature maps flattened row-major; for RoI ``r``, its map of
    ``height[r] x width[r]`` cells (float ``[R]``) starts at row ``first_row[r]`` (int32 ``[R]``)
    of the table.  ``top, left, roi_h, roi_w [R]`` give the RoI in that map's cell-centre
    frame.  Returns ``[R, oh, ow, C]``.
    """
    oh, ow = output_size
    s = sampling_ratio
    channels = table.shape[-1] if table.shape[-1] is not None else tf.shape(table)[-1]

    ys = _sample_positions(top, roi_h, oh, s)  # [R, oh*s]
    xs = _sample_positions(left, roi_w, ow, s)  # [R, ow*s]
    y_low, y_high, wy_low, wy_high = _linear_taps(ys, height[:, None])
    x_low, x_high, wx_low, wx_high = _linear_taps(xs, width[:, None])

    # Stack the two taps last and group each bin's samples: the s samples of a bin with
    # their 2 taps each give 2*s (row, weight) pairs.
    # [R, oh*s] x2 -> [R, oh*s, 2] -> [R, oh, 2*s]   (and the same for columns with ow)
    row = tf.reshape(tf.stack([y_low, y_high], axis=-1), [-1, oh, 2 * s])
    row_w = tf.reshape(tf.stack([wy_low, wy_high], axis=-1), [-1, oh, 2 * s])
    col = tf.reshape(tf.stack([x_low, x_high], axis=-1), [-1, ow, 2 * s])
    col_w = tf.reshape(tf.stack([wx_low, wx_high], axis=-1), [-1, ow, 2 * s])

    # Every (row pair, column pair) of every bin, by broadcasting
    # [R, oh, 1, 2s, 1] against [R, 1, ow, 1, 2s] -> [R, oh, ow, 2s, 2s];
    # flat table row = first_row + y * width + x.
    row_start = first_row[:, None, None] + row * tf.cast(width, tf.int32)[:, None, None]
    index = row_start[:, :, None, :, None] + col[:, None, :, None, :]
    # Bilinear weight = row weight x column weight; dividing by s*s turns the sum into the
    # bin average (samples outside the map count, with weight 0, as in torchvision).
    weight = row_w[:, :, None, :, None] * col_w[:, None, :, None, :] / (s * s)

    # One output value = weighted sum of 4*s*s table rows:
    # [R, oh, ow, 2s, 2s] -> [R*oh*ow, 4*s*s]   (and [R*oh*ow, 1, 4*s*s] for the weights)
    index = tf.reshape(index, [-1, 4 * s * s])
    weight = tf.cast(tf.reshape(weight, [-1, 1, 4 * s * s]), table.dtype)
    values = tf.gather(table, index)  # [R*oh*ow, 4*s*s, C]
    pooled = tf.matmul(weight, values)  # [R*oh*ow, 1, C]
    return tf.reshape(pooled, [-1, oh, ow, channels])  # [R*oh*ow, 1, C] -> [R, oh, ow, C]


def _separable_pool(features, box_indices, top, left, roi_h, roi_w, output_size, sampling_ratio):
    """The RoIAlign kernel on one feature map, one axis after the other.

    features ``[B, H, W, C]``, box_indices int32 ``[R]``, ``top, left, roi_h, roi_w [R]`` the RoIs
    in the map's cell-centre frame -> ``[R, oh, ow, C]``.

    A bilinear weight is (row weight) x (column weight), and so is a bin's average of samples,
    so the interpolation separates: first along y, each output row is a weighted sum of ``2 s``
    whole map rows (the two taps of its ``s`` samples); then along x, each output value a
    weighted sum of ``2 s`` cells of that row.  The same numbers as :func:`_bilinear_pool` up to
    float rounding, with a few large gathers (whole rows ``[W, C]``) instead of one small gather
    per tap: on the single-channel masks that :mod:`minimask.targets` cuts its mask targets from
    it is ~3x faster.  It reads ``2 s W`` cells per output row where :func:`_bilinear_pool`
    reads ``4 s^2`` per output value, so it suits one map of moderate width (the FPN levels,
    whose widths differ, use :func:`_bilinear_pool`).
    """
    oh, ow = output_size
    s = sampling_ratio
    shape = tf.shape(features)
    ys = _sample_positions(top, roi_h, oh, s)  # [R, oh*s]
    xs = _sample_positions(left, roi_w, ow, s)  # [R, ow*s]
    y_low, y_high, wy_low, wy_high = _linear_taps(ys, tf.cast(shape[1], tf.float32))
    x_low, x_high, wx_low, wx_high = _linear_taps(xs, tf.cast(shape[2], tf.float32))
    # The 2s taps of each output row, and their weights / s (the average over the s samples):
    # [R, oh*s] x2 -> [R, oh*s, 2] -> [R, oh, 2*s]   (the same for the columns with ow)
    rows = tf.reshape(tf.stack([y_low, y_high], axis=-1), [-1, oh, 2 * s])
    row_w = tf.reshape(tf.stack([wy_low, wy_high], axis=-1), [-1, oh, 2 * s]) / s
    cols = tf.reshape(tf.stack([x_low, x_high], axis=-1), [-1, ow, 2 * s])
    col_w = tf.reshape(tf.stack([wx_low, wx_high], axis=-1), [-1, ow, 2 * s]) / s

    # Along y: [B, H, W, C] -> map rows [B*H, W, C]; gather [R, oh, 2s] of them -> [R, oh, 2s, W, C];
    # weighted sum over the taps -> [R, oh, W, C]
    map_rows = tf.reshape(features, tf.concat([[-1], shape[2:]], axis=0))
    lines = tf.gather(map_rows, box_indices[:, None, None] * shape[1] + rows)
    along_y = tf.reduce_sum(tf.cast(row_w, features.dtype)[..., None, None] * lines, axis=2)
    # Along x: the RoI's columns of those rows, [R, oh, W, C] at [R, ow, 2s] -> [R, oh, ow, 2s, C];
    # weighted sum over the taps -> [R, oh, ow, C]
    taps = tf.gather(along_y, cols, axis=2, batch_dims=1)
    return tf.reduce_sum(tf.cast(col_w, features.dtype)[:, None, :, :, None] * taps, axis=3)


def _edge_padded_canvas(maps):
    """Maps ``[B, Hl, Wl, C]`` -> (canvas ``[B, sum_l (Hl + 2), max_l Wl + 2, C]``, int32 ``[L]``
    canvas row of each map's cell (0, 0)).

    Each map gets one copy of its border cells all around (so that bilinear sampling within
    one cell outside the map reads the border, RoIAlign's clamp), is zero-padded on the
    right to the widest map, and the maps are stacked vertically.
    """
    widths = tf.stack([tf.shape(m)[2] for m in maps])  # [L]
    widest = tf.reduce_max(widths)
    blocks = []
    for fmap, width in zip(maps, tf.unstack(widths)):
        block = tf.pad(fmap, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")  # border copy
        blocks.append(tf.pad(block, [[0, 0], [0, 0], [0, widest - width], [0, 0]]))
    block_heights = tf.stack([tf.shape(m)[1] + 2 for m in maps])  # [L]
    first_row = tf.cumsum(block_heights, exclusive=True) + 1  # skip the block's border row
    return tf.concat(blocks, axis=1), first_row


def _crop_and_resize_pool(canvas, image_index, canvas_top, height, width, top, left, roi_h,
                          roi_w, output_size, sampling_ratio):
    """RoIAlign through ``tf.image.crop_and_resize`` on an edge-padded canvas.

    ``canvas [N, Hc, Wc, C]`` from :func:`_edge_padded_canvas`; for RoI ``r`` (image
    ``image_index[r]``), its map of ``height[r] x width[r]`` cells (float ``[R]``) has its cell
    (0, 0) at canvas row ``canvas_top[r]`` (float ``[R]``), column 1.  ``top, left, roi_h, roi_w``
    ``[R]`` give the RoI in the map's cell-centre frame.  Returns ``[R, oh, ow, C]``.
    """
    oh, ow = output_size
    s = sampling_ratio
    ys = _sample_positions(top, roi_h, oh, s)  # [R, oh*s], map frame
    xs = _sample_positions(left, roi_w, ow, s)  # [R, ow*s]
    # crop_and_resize samples n evenly spaced points from its box's first edge to its last,
    # in coordinates normalised by (canvas size - 1): give it the first and last samples.
    last = tf.cast(tf.shape(canvas)[1:3] - 1, tf.float32)
    crop_boxes = tf.stack(
        [(ys[:, 0] + canvas_top) / last[0], (xs[:, 0] + 1.0) / last[1],
         (ys[:, -1] + canvas_top) / last[0], (xs[:, -1] + 1.0) / last[1]], axis=1)
    samples = tf.image.crop_and_resize(canvas, crop_boxes, image_index, (oh * s, ow * s))
    # Samples farther than one cell off their map count as 0 (on the canvas they would
    # read a neighbouring map or the zero padding).
    inside_y = tf.cast((ys >= -1.0) & (ys <= height[:, None]), samples.dtype)  # [R, oh*s]
    inside_x = tf.cast((xs >= -1.0) & (xs <= width[:, None]), samples.dtype)  # [R, ow*s]
    samples *= inside_y[:, :, None, None] * inside_x[:, None, :, None]  # [R, oh*s, ow*s, C]
    return tf.nn.avg_pool2d(samples, s, s, "VALID")  # -> [R, oh, ow, C]


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------


def roi_align(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio=2,
              aligned=True, implementation="gather"):
    """RoIAlign: features ``[B, H, W, C]``, boxes ``[R, 4]`` (y1, x1, y2, x2, image pixels),
    box_indices int32 ``[R]`` (image of each box) -> ``[R, oh, ow, C]``.

    Each output bin averages ``sampling_ratio x sampling_ratio`` bilinear samples placed
    regularly inside it (Mask R-CNN Sec. 3).  ``spatial_scale`` = 1 / stride of ``features``.
    ``aligned`` and the out-of-map rule: see the module docstring.  ``sampling_ratio`` must be
    a positive int (the adaptive ``<= 0`` mode is not supported).  ``implementation``:
    ``"gather"`` or ``"crop_and_resize"`` (same values, see the module docstring).
    """
    output_size = _output_pair(output_size)
    sampling_ratio = _check_sampling_ratio(sampling_ratio)
    _check_implementation(implementation)
    features = _check_features(features)
    boxes, box_indices = _check_boxes(boxes, box_indices)

    top, left, roi_h, roi_w = _roi_in_cells(boxes, spatial_scale, aligned)

    if implementation == "crop_and_resize":
        shape = tf.shape(features)
        num_rois = tf.shape(boxes)[0]
        height = tf.fill([num_rois], tf.cast(shape[1], tf.float32))  # [R]: the map of every RoI
        width = tf.fill([num_rois], tf.cast(shape[2], tf.float32))
        canvas, canvas_top = _edge_padded_canvas([features])
        pooled = _crop_and_resize_pool(
            canvas, box_indices, tf.fill([num_rois], tf.cast(canvas_top[0], tf.float32)),
            height, width, top, left, roi_h, roi_w, output_size, sampling_ratio)
        return tf.cast(pooled, features.dtype)

    return _separable_pool(features, box_indices, top, left, roi_h, roi_w, output_size, sampling_ratio)


def _round_half_away_from_zero(x):
    """C's ``round()`` (torchvision's RoIPool uses it); ``tf.round`` rounds half to even."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def _pool_bin_edges(start, size, bins, length):
    """RoIPool bin edges along one axis: ``start, size`` int-valued float ``[R]`` ->
    ``(begin, end)`` int32 ``[R, bins]``, cells ``begin <= i < end``, clipped to ``[0, length]``."""
    bin_size = size / bins  # [R]
    i = tf.range(bins, dtype=tf.float32)
    begin = start[:, None] + tf.floor(i[None, :] * bin_size[:, None])
    end = start[:, None] + tf.math.ceil((i[None, :] + 1.0) * bin_size[:, None])
    length = tf.cast(length, tf.float32)
    begin = tf.clip_by_value(begin, 0.0, length)
    end = tf.clip_by_value(end, 0.0, length)
    return tf.cast(begin, tf.int32), tf.cast(end, tf.int32)


def roi_pool(features, boxes, box_indices, output_size, spatial_scale):
    """RoIPool (Fast R-CNN Sec. 2.1): features ``[B, H, W, C]``, boxes ``[R, 4]`` (y1, x1, y2, x2,
    image pixels), box_indices int32 ``[R]`` -> ``[R, oh, ow, C]``, max of each bin (0 if empty).

    The quantized definition of torchvision's ``roi_pool``: the RoI is snapped to cells with
    ``round`` (half away from zero) and forced to at least one cell; bin ``i`` of ``n`` covers
    cells ``floor(i * size / n) .. ceil((i + 1) * size / n) - 1`` from the snapped start
    (neighbouring bins may share a cell), clipped to the map.  One difference, from the box
    convention: minimask boxes are continuous (the end is *exclusive*: ``(3, 0, 8, 7)`` covers
    rows 3..7 and columns 0..6), whereas torchvision's legacy boxes are inclusive pixel indices,
    so its size is ``end - start + 1``; torchvision's box ``(3, 0, 7, 6)`` is our ``(3, 0, 8, 7)``.

    Vectorized with masks, no loop over RoIs: each RoI's whole map is masked per bin column,
    max-reduced, then per bin row.  Time and memory ``O(R * H * W * ow * C)``: fine for the
    small maps of MNIST scenes and for teaching; the model itself uses :func:`roi_align`.
    """
    oh, ow = _output_pair(output_size)
    features = _check_features(features)
    boxes, box_indices = _check_boxes(boxes, box_indices)
    shape = tf.shape(features)
    height, width = shape[1], shape[2]

    snapped = _round_half_away_from_zero(boxes * tf.cast(spatial_scale, tf.float32))
    y1, x1, y2, x2 = tf.unstack(snapped, axis=-1)
    row_begin, row_end = _pool_bin_edges(y1, tf.maximum(y2 - y1, 1.0), oh, height)  # [R, oh]
    col_begin, col_end = _pool_bin_edges(x1, tf.maximum(x2 - x1, 1.0), ow, width)  # [R, ow]

    rows = tf.range(height)[None, None, :]  # [1, 1, H]
    cols = tf.range(width)[None, None, :]  # [1, 1, W]
    in_row_bin = (rows >= row_begin[:, :, None]) & (rows < row_end[:, :, None])  # [R, oh, H]
    in_col_bin = (cols >= col_begin[:, :, None]) & (cols < col_end[:, :, None])  # [R, ow, W]

    lowest = tf.constant(-np.inf, features.dtype)
    maps = tf.gather(features, box_indices)  # [R, H, W, C]
    # Max over each bin's columns: [R, H, 1, W, C] masked by [R, 1, ow, W, 1] -> [R, H, ow, C]
    col_max = tf.reduce_max(
        tf.where(in_col_bin[:, None, :, :, None], maps[:, :, None], lowest), axis=3)
    # ... then over each bin's rows: [R, 1, H, ow, C] masked by [R, oh, H, 1, 1] -> [R, oh, ow, C]
    pooled = tf.reduce_max(
        tf.where(in_row_bin[:, :, :, None, None], col_max[:, None], lowest), axis=2)

    # A bin that lies entirely off the map is empty: 0, as in torchvision.
    empty = (row_end <= row_begin)[:, :, None] | (col_end <= col_begin)[:, None, :]  # [R, oh, ow]
    return tf.where(empty[..., None], tf.zeros_like(pooled), pooled)


def assign_levels(boxes, min_level=2, max_level=5, canonical_size=224.0, canonical_level=4):
    """FPN level of each RoI: boxes ``[..., 4]`` (y1, x1, y2, x2, image pixels) -> int32 ``[...]``.

    FPN Eqn. 1: ``k = floor(k0 + log2(sqrt(w h) / s0))``, clamped to ``[min_level, max_level]``;
    ``s0 = canonical_size`` is the RoI size that pools from level ``k0 = canonical_level``.  The
    paper's 224 is the ImageNet pre-training size; small objects (28-px digits) want a
    smaller ``s0``.  ``LEVEL_EPSILON`` inside the log keeps empty boxes finite (Detectron2).
    """
    if not min_level <= max_level:
        raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level})")
    if canonical_size <= 0:
        raise ValueError(f"canonical_size must be positive, got {canonical_size}")
    size = tf.sqrt(area(boxes))  # [...]
    level = tf.floor(canonical_level + tf.math.log(size / canonical_size + LEVEL_EPSILON)
                     / np.log(2.0))
    level = tf.clip_by_value(level, float(min_level), float(max_level))
    return tf.cast(level, tf.int32)


def multilevel_roi_align(features, boxes, output_size, sampling_ratio=2, aligned=True,
                         canonical_size=224.0, canonical_level=4, min_level=2,
                         implementation="gather"):
    """RoIAlign on a feature pyramid: ``features`` = list of ``[B, Hl, Wl, C]`` for levels
    ``min_level, min_level + 1, ...`` (stride ``2**level``), boxes ``[B, R, 4]`` (y1, x1, y2, x2,
    image pixels) -> ``[B, R, oh, ow, C]`` in the input RoI order.

    Each RoI pools from the level :func:`assign_levels` gives it (FPN Eqn. 1).  All levels are
    flattened into one table ``[sum_l B*Hl*Wl, C]``; each RoI looks up its level's size, first
    table row and scale, so a single gather serves every level: no per-level partition and
    stitch, and no level is computed for RoIs that do not use it.  With
    ``implementation="crop_and_resize"`` the levels are stacked into one edge-padded canvas
    instead and one ``crop_and_resize`` call serves every level, the same way.
    """
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError("features must be a non-empty list of [B, H, W, C] maps, one per level")
    features = [_check_features(f) for f in features]
    channels = [f.shape[-1] for f in features]
    if len(set(channels)) != 1:
        raise ValueError(f"all pyramid levels must have the same channels, got {channels}")
    output_size = _output_pair(output_size)
    sampling_ratio = _check_sampling_ratio(sampling_ratio)
    _check_implementation(implementation)
    boxes = tf.stop_gradient(tf.convert_to_tensor(boxes, tf.float32))
    if boxes.shape.rank != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B, R, 4] (y1, x1, y2, x2), got {boxes.shape}")

    num_levels = len(features)
    batch, num_rois = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat_boxes = tf.reshape(boxes, [-1, 4])  # [B, R, 4] -> [B*R, 4]
    image = tf.repeat(tf.range(batch), num_rois)  # [B*R]: image of each RoI
    level = assign_levels(flat_boxes, min_level, min_level + num_levels - 1, canonical_size,
                          canonical_level) - min_level  # [B*R], 0-based

    # Per-level constants, then each RoI's own by gathering with its level.
    heights = tf.stack([tf.shape(f)[1] for f in features])  # [L]
    widths = tf.stack([tf.shape(f)[2] for f in features])  # [L]
    scales = tf.constant([2.0 ** -(min_level + i) for i in range(num_levels)], tf.float32)

    height = tf.gather(heights, level)  # [B*R]
    width = tf.gather(widths, level)
    channel_count = features[0].shape[-1] if features[0].shape[-1] is not None else tf.shape(
        features[0])[-1]
    top, left, roi_h, roi_w = _roi_in_cells(flat_boxes, tf.gather(scales, level), aligned)
    roi_map = (tf.cast(height, tf.float32), tf.cast(width, tf.float32),
               top, left, roi_h, roi_w, output_size, sampling_ratio)

    if implementation == "crop_and_resize":
        canvas, canvas_top = _edge_padded_canvas(features)
        canvas_top = tf.cast(tf.gather(canvas_top, level), tf.float32)  # [B*R]
        pooled = tf.cast(_crop_and_resize_pool(canvas, image, canvas_top, *roi_map),
                         features[0].dtype)  # [B*R, oh, ow, C]
    else:
        level_start = tf.cumsum(batch * heights * widths, exclusive=True)  # [L] first table row
        first_row = tf.gather(level_start, level) + image * height * width  # [B*R]
        # [B, Hl, Wl, C] per level -> [B*Hl*Wl, C] -> one table [sum_l B*Hl*Wl, C]
        table = tf.concat([tf.reshape(f, [-1, channel_count]) for f in features], axis=0)
        pooled = _bilinear_pool(table, first_row, *roi_map)  # [B*R, oh, ow, C]
    oh, ow = output_size
    return tf.reshape(pooled, [batch, num_rois, oh, ow, channel_count])  # -> [B, R, oh, ow, C]


@keras.saving.register_keras_serializable(package="minimask")
class MultiLevelRoIAlign(keras.layers.Layer):
    """Keras layer around :func:`multilevel_roi_align`: (list of ``[B, Hl, Wl, C]`` for
    P{min_level}.., boxes ``[B, R, 4]`` (y1, x1, y2, x2, image pixels)) -> ``[B, R, oh, ow, C]``."""

    def __init__(self, *, output_size=7, sampling_ratio=2, aligned=True, canonical_size=224.0,
                 canonical_level=4, min_level=2, implementation="gather", **kwargs):
        super().__init__(**kwargs)
        self.output_size = _output_pair(output_size)
        self.sampling_ratio = _check_sampling_ratio(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.min_level = int(min_level)
        self.implementation = _check_implementation(implementation)

    def call(self, features, boxes):
        return multilevel_roi_align(
            list(features), boxes, self.output_size, sampling_ratio=self.sampling_ratio,
            aligned=self.aligned, canonical_size=self.canonical_size,
            canonical_level=self.canonical_level, min_level=self.min_level,
            implementation=self.implementation,
        )

    def compute_output_shape(self, features_shape, boxes_shape):
        return (boxes_shape[0], boxes_shape[1], *self.output_size, features_shape[0][-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            output_size=list(self.output_size),
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            canonical_size=self.canonical_size,
            canonical_level=self.canonical_level,
            min_level=self.min_level,
            implementation=self.implementation,
        )
        return config
