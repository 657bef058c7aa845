"""Tests of minimask.targets: a hand-worked scene, sampling counts checked against numpy IoUs,
uniform sampling, images without objects, seeds and tf.function."""
import numpy as np
import pytest
import tensorflow as tf

from minimask.targets import NO_MATCH, detection_targets

SIZE = 32  # image side of the hand-worked scene


def numpy_iou(a, b):
    """IoU of one box against many, (y1, x1, y2, x2), written for reading."""
    top = np.maximum(a[0], b[:, 0])
    left = np.maximum(a[1], b[:, 1])
    bottom = np.minimum(a[2], b[:, 2])
    right = np.minimum(a[3], b[:, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def hand_scene():
    """Image 0: two objects; image 1: no object.  Padding rows hold boxes that would be
    positive if they were (wrongly) used."""
    gt_boxes = np.zeros((2, 3, 4), np.float32)
    gt_boxes[0, 0] = [4, 4, 20, 12]  # class 3, its mask fills the box
    gt_boxes[0, 1] = [10, 16, 26, 30]  # class 7, its mask fills the box
    gt_boxes[:, 2] = [10, 16, 26, 30]  # padding
    gt_boxes[1, :2] = [4, 4, 20, 12]  # padding (num_gt = 0 in image 1)
    class_ids = np.array([[3, 7, 5], [2, 2, 2]], np.int32)
    masks = np.zeros((2, 3, SIZE, SIZE), bool)
    masks[0, 0, 4:20, 4:12] = True
    masks[0, 1, 10:26, 16:30] = True
    masks[1] = True  # padding
    proposals = np.zeros((2, 6, 4), np.float32)
    proposals[0, :4] = [
        [4, 4, 20, 13],  # IoU 128/144 = 0.89 with object 0 -> positive, class 3
        [0, 0, 8, 8],  # IoU 16/176 = 0.09 with object 0 -> background
        [28, 0, 32, 4],  # IoU 0 -> background
        [10, 17, 26, 30],  # IoU 208/224 = 0.93 with object 1 -> positive, class 7
    ]
    proposals[0, 4:] = [4, 4, 20, 12]  # padding
    proposals[1, :3] = [[0, 0, 5, 5], [3, 3, 9, 9], [1, 1, 30, 30]]
    proposals[1, 3:] = [4, 4, 20, 12]  # padding
    return dict(proposals=proposals, num_proposals=np.array([4, 3], np.int32),
                gt_boxes=gt_boxes, gt_class_ids=class_ids, gt_masks=masks,
                num_gt=np.array([2, 0], np.int32))


def find_row(rois, box):
    rows = np.nonzero(np.all(np.isclose(rois, box), axis=1))[0]
    assert len(rows) == 1, f"{box} appears {len(rows)} times in {rois}"
    return rows[0]


def test_hand_worked_scene():
    scene = hand_scene()
    out = {k: v.numpy() for k, v in detection_targets(
        **scene, num_rois=8, positive_fraction=0.5, seed=1).items()}

    # Image 0: 4 proposals + 2 gt boxes = 6 candidates, all sampled; 2 padding slots.
    assert out["roi_valid"][0].tolist() == [True] * 6 + [False] * 2
    rois = out["rois"][0]
    expected = {  # box -> (class, matched gt, box deltas)
        (4, 4, 20, 13): (3, 0, [0.0, 10 * (8 - 8.5) / 9, 5 * np.log(16 / 16), 5 * np.log(8 / 9)]),
        (10, 17, 26, 30): (7, 1, [0.0, 10 * (23 - 23.5) / 13, 0.0, 5 * np.log(14 / 13)]),
        (4, 4, 20, 12): (3, 0, [0.0, 0.0, 0.0, 0.0]),  # the gt box itself, added as a RoI
        (10, 16, 26, 30): (7, 1, [0.0, 0.0, 0.0, 0.0]),
        (0, 0, 8, 8): (0, NO_MATCH, [0.0] * 4),
        (28, 0, 32, 4): (0, NO_MATCH, [0.0] * 4),
    }
    for box, (class_id, matched, deltas) in expected.items():
        row = find_row(rois[:6], box)
        assert out["class_targets"][0, row] == class_id
        assert out["positive"][0, row] == (class_id > 0)
        assert out["matched_gt"][0, row] == matched
        np.testing.assert_allclose(out["box_targets"][0, row], deltas, atol=1e-5)
    assert out["positive"][0, :4].all()  # positives come first

    # The mask target of RoI (4, 4, 20, 13) for the mask filling rows 4..19, columns 4..11.
    # Columns: 28 bins of 9/28 px from x = 4; the mask ends at x = 12.  Bin 24 spans
    # [11.71, 12.04): samples at 11.80 and 11.96, i.e. 11.30 and 11.46 in the cell-centre
    # frame where the mask falls linearly from 1 at 11 to 0 at 12: (0.70 + 0.54) / 2 = 0.62
    # -> 1.  Bin 25: samples at 11.62 and 11.78 -> (0.38 + 0.22) / 2 = 0.30 -> 0.
    # Rows: the RoI's top edge is the mask's; bin 0's samples sit at 3.64 and 3.93 (cell-centre
    # frame) -> (0.64 + 0.93) / 2 = 0.79 -> 1 (the bottom edge alike).  At the two corners
    # of column 24 the factors multiply: 0.79 * 0.62 = 0.49 < 0.5 -> 0.
    want = np.zeros((28, 28), np.float32)
    want[:, :25] = 1.0
    want[0, 24] = want[27, 24] = 0.0
    np.testing.assert_array_equal(out["mask_targets"][0, find_row(rois, (4, 4, 20, 13))], want)
    # The gt box as RoI sees its full mask.
    np.testing.assert_array_equal(out["mask_targets"][0, find_row(rois, (4, 4, 20, 12))], 1.0)
    # Background RoIs have no mask target.
    assert out["mask_targets"][0, ~out["positive"][0]].sum() == 0

    # Image 1 has no object: 3 background RoIs, nothing else, all finite.
    assert out["roi_valid"][1].tolist() == [True] * 3 + [False] * 5
    assert not out["positive"][1].any()
    assert (out["class_targets"][1] == 0).all() and (out["matched_gt"][1] == NO_MATCH).all()
    assert (out["box_targets"][1] == 0).all() and (out["mask_targets"][1] == 0).all()
    for value in out.values():
        assert np.isfinite(value.astype(np.float64)).all()


def random_scene(rng, batch=3, num_gt=6, num_proposals=300, size=64):
    """Random objects and proposals: jittered copies of the objects (many positives) and
    random boxes (mostly background)."""
    top_left = rng.uniform(0, size - 20, size=(batch, num_gt, 2))
    gt_boxes = np.concatenate([top_left, top_left + rng.uniform(8, 20, size=(batch, num_gt, 2))],
                              axis=-1).astype(np.float32)
    near = np.repeat(gt_boxes, num_proposals // (2 * num_gt), axis=1)
    near = near + rng.normal(scale=2.0, size=near.shape)
    corner = rng.uniform(0, size - 4, size=(batch, num_proposals - near.shape[1], 2))
    far = np.concatenate([corner, corner + rng.uniform(2, 30, size=corner.shape)], axis=-1)
    proposals = np.concatenate([near, far], axis=1).astype(np.float32)
    proposals[..., 2:] = np.maximum(proposals[..., 2:], proposals[..., :2] + 1.0)
    masks = np.zeros((batch, num_gt, size, size), bool)
    for b in range(batch):
        for m, (y1, x1, y2, x2) in enumerate(gt_boxes[b].astype(int)):
            masks[b, m, y1:y2, x1:x2] = True
    class_ids = rng.integers(1, 11, size=(batch, num_gt)).astype(np.int32)
    return dict(proposals=proposals, gt_boxes=gt_boxes, gt_class_ids=class_ids, gt_masks=masks)


@pytest.mark.parametrize("num_proposals, num_gt, low", [
    ([300, 40, 5], [6, 1, 3], 0.0),  # many positives / few positives / few candidates
    ([300, 300, 0], [6, 0, 2], 0.1),  # a lower background bound; an image without objects
])
def test_sampling_counts_and_labels_against_numpy(num_proposals, num_gt, low):
    rng = np.random.default_rng(sum(num_proposals))
    scene = random_scene(rng)
    num_rois, fraction = 64, 0.25
    out = {k: v.numpy() for k, v in detection_targets(
        **scene, num_proposals=np.array(num_proposals, np.int32), num_gt=np.array(num_gt, np.int32),
        num_rois=num_rois, positive_fraction=fraction, negative_iou_low=low, seed=7).items()}
    for b in range(3):
        gt = scene["gt_boxes"][b, : num_gt[b]]
        candidates = np.concatenate([scene["proposals"][b, : num_proposals[b]], gt])
        best = np.array([numpy_iou(c, gt).max() if len(gt) else 0.0 for c in candidates])
        num_pos_candidates = (best >= 0.5).sum()
        num_neg_candidates = ((best < 0.5) & (best >= low)).sum()
        want_pos = min(num_pos_candidates, int(num_rois * fraction))
        want_neg = min(num_neg_candidates, num_rois - want_pos)
        assert out["positive"][b].sum() == want_pos
        assert out["roi_valid"][b].sum() == want_pos + want_neg

        valid = out["roi_valid"][b]
        rois = out["rois"][b][valid]
        assert len(np.unique(rois, axis=0)) == len(rois)  # sampled without replacement
        for roi, positive, matched, class_id in zip(rois, out["positive"][b][valid],
                                                    out["matched_gt"][b][valid],
                                                    out["class_targets"][b][valid]):
            overlaps = numpy_iou(roi, gt) if len(gt) else np.zeros(1)
            if positive:
                assert overlaps.max() >= 0.5 and matched == np.argmax(overlaps)
                assert class_id == scene["gt_class_ids"][b, matched]
            else:
                assert low <= overlaps.max() < 0.5 and matched == NO_MATCH and class_id == 0
        assert not out["positive"][b][~valid].any()


def test_positives_are_sampled_uniformly():
    """400 copies of one image: each of its 12 positive candidates (10 proposals + 2 gt) is
    picked with probability 4 / 12 (expected 133 of 400, std 9.4)."""
    copies = 400
    gt_boxes = np.tile(np.array([[[0, 0, 20, 20], [30, 30, 50, 50]]], np.float32), (copies, 1, 1))
    shifts = np.arange(1, 11, dtype=np.float32)[:, None] * 0.3  # IoU >= 0.56
    proposals = np.concatenate([np.array([[0, 0, 20, 20]]) + shifts[:5],
                                np.array([[30, 30, 50, 50]]) + shifts[5:],
                                np.array([[55, 0, 60, 5]] * 6)]).astype(np.float32)
    out = detection_targets(
        np.tile(proposals[None], (copies, 1, 1)), np.full(copies, 16, np.int32), gt_boxes,
        np.ones((copies, 2), np.int32), np.zeros((copies, 2, 64, 64), bool),
        np.full(copies, 2, np.int32), num_rois=16, positive_fraction=0.25, seed=3)
    rois = out["rois"].numpy()[out["positive"].numpy()]  # [copies * 4, 4]
    assert len(rois) == copies * 4
    candidates = np.concatenate([proposals[:10], gt_boxes[0]])
    counts = [np.all(np.isclose(rois, c), axis=1).sum() for c in candidates]
    assert all(abs(c - copies * 4 / 12) < 40 for c in counts), counts


def test_no_objects_and_no_proposals():
    """A batch with M = 0 (no gt rows at all) and an image with no proposals either."""
    out = detection_targets(
        np.array([[[0, 0, 10, 10], [5, 5, 9, 9]], [[0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
        np.array([2, 0], np.int32), np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), np.int32),
        np.zeros((2, 0, 16, 16), bool), np.zeros(2, np.int32), num_rois=4, seed=0)
    assert out["roi_valid"].numpy().tolist() == [[True, True, False, False], [False] * 4]
    assert not out["positive"].numpy().any()
    assert out["mask_targets"].shape == (2, 4, 28, 28)
    for value in out.values():
        assert np.isfinite(value.numpy().astype(np.float64)).all()


def test_zero_positive_fraction():
    """positive_fraction = 0 samples background only; positives are not background."""
    out = detection_targets(**hand_scene(), num_rois=8, positive_fraction=0.0, seed=0)
    assert not out["positive"].numpy().any()
    assert out["roi_valid"].numpy().sum(axis=1).tolist() == [2, 3]
    assert out["mask_targets"].shape == (2, 8, 28, 28)


def test_seed_determinism_and_tf_function():
    rng = np.random.default_rng(0)
    scene = random_scene(rng)
    counts = dict(num_proposals=np.array([300, 100, 50], np.int32),
                  num_gt=np.array([6, 2, 4], np.int32))

    def run(seed):
        return detection_targets(**scene, **counts, num_rois=32, seed=seed)

    first, again, other = run(11), run(11), run(12)
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())
    assert not np.array_equal(first["rois"].numpy(), other["rois"].numpy())

    traced = tf.function(
        lambda seed, *args: detection_targets(*args, num_rois=32, seed=seed))
    args = (scene["proposals"], counts["num_proposals"], scene["gt_boxes"],
            scene["gt_class_ids"], scene["gt_masks"], counts["num_gt"])
    graph = traced(tf.constant([11, 0]), *args)
    for key in first:
        np.testing.assert_allclose(graph[key].numpy(), first[key].numpy(), atol=1e-5)
    traced(tf.constant([12, 0]), *args)  # a new seed tensor does not retrace
    assert traced.experimental_get_tracing_count() == 1


def test_bad_thresholds_raise():
    scene = hand_scene()
    with pytest.raises(ValueError, match="negative_iou"):
        detection_targets(**scene, negative_iou_high=0.6, positive_iou=0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        detection_targets(**scene, positive_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        detection_targets(**scene, seed=[1, 2, 3])
