"""COCO evaluation: perfect detections score AP 1, errors cost what pycocotools says, RLE is right."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from minimask import evaluate
from minimask.boxes import boxes_from_masks
from synthetic_data import MnistDetection

NAMES = ["background", "a", "b", "c"]


def _sample(image_id, boxes_and_classes, size=64):
    masks = np.zeros((len(boxes_and_classes), size, size), bool)
    for n, ((y1, x1, y2, x2), _) in enumerate(boxes_and_classes):
        masks[n, y1:y2, x1:x2] = True
    return {"image": np.zeros((size, size, 3), np.uint8), "masks": masks,
            "boxes": boxes_from_masks(masks), "class_ids": np.array([c for _, c in boxes_and_classes], np.int32),
            "image_id": image_id}


def _perfect(samples):
    return [{"boxes": s["boxes"], "class_ids": s["class_ids"], "scores": np.ones(len(s["boxes"])),
             "masks": s["masks"]} for s in samples]


@pytest.fixture(scope="module")
def samples():
    return [
        _sample(1, [((2, 3, 30, 20), 1), ((30, 30, 60, 50), 2)]),
        _sample(2, [((10, 10, 40, 40), 3)]),
        _sample(3, []),  # an image with no objects
    ]


def test_perfect_predictions_score_one(samples):
    gt = evaluate.coco_from_dict(evaluate.coco_dict_from_samples(samples, NAMES))
    results = evaluate.detections_to_coco_results([s["image_id"] for s in samples], _perfect(samples))
    metrics = evaluate.evaluate_coco(gt, results, verbose=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert set(metrics[iou_type]["per_class"]) == {"a", "b", "c"}
        assert all(v == pytest.approx(1.0) for v in metrics[iou_type]["per_class"].values())


def test_results_are_coco_xywh_and_decodable_rle(samples):
    results = evaluate.detections_to_coco_results([1], _perfect(samples[:1]))
    assert results[0]["bbox"] == [3.0, 2.0, 17.0, 28.0]  # x, y, w, h of rows 2..29, cols 3..19
    decoded = mask_utils.decode(results[0]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(decoded, samples[0]["masks"][0])


def test_wrong_class_and_missed_object_cost_ap(samples):
    gt = evaluate.coco_from_dict(evaluate.coco_dict_from_samples(samples, NAMES))
    dets = _perfect(samples)
    dets[1] = dict(dets[1], class_ids=np.array([1], np.int32))  # class c predicted as a
    dets[0] = {k: v[:1] for k, v in dets[0].items()}  # object of class b missed
    results = evaluate.detections_to_coco_results([s["image_id"] for s in samples], dets)
    metrics = evaluate.evaluate_coco(gt, results, iou_types=("bbox",), verbose=False)
    per_class = metrics["bbox"]["per_class"]
    assert per_class["b"] == 0.0 and per_class["c"] == 0.0
    # class a: one true positive at score 1 ranked with a false positive at the same score
    assert 0.0 < per_class["a"] <= 1.0
    assert metrics["bbox"]["AP"] < 0.5


def test_no_results_score_zero(samples):
    gt = evaluate.coco_from_dict(evaluate.coco_dict_from_samples(samples, NAMES))
    metrics = evaluate.evaluate_coco(gt, [], verbose=False)
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    assert evaluate.summary(metrics)["segm"]["AP50"] == 0.0


def test_confusion_matrix_hand_case(samples):
    dets = _perfect(samples)
    dets[1] = dict(dets[1], class_ids=np.array([1], np.int32))  # c -> a
    dets[0] = {k: v[:1] for k, v in dets[0].items()}  # b missed
    dets[2] = {"boxes": np.array([[0, 0, 5, 5]], np.float32), "class_ids": np.array([2]),
               "scores": np.array([0.9])}  # a false positive on the empty image
    matrix = evaluate.confusion_matrix(samples, dets, num_classes=3)
    expected = np.zeros((4, 4), int)
    expected[1, 1] = 1  # a found as a
    expected[2, 0] = 1  # b missed
    expected[3, 1] = 1  # c called a
    expected[0, 2] = 1  # false positive b
    np.testing.assert_array_equal(matrix, expected)


def test_synthetic_ground_truth_matches_export_writer():
    scenes = MnistDetection("val", 4, seed=3, image_size=64, digit_size=(14, 30))
    samples = [scenes[i] for i in range(4)]
    coco = evaluate.coco_dict_from_samples(samples, scenes.category_names)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert len(coco["annotations"]) == sum(len(s["boxes"]) for s in samples)
    ann = coco["annotations"][0]
    np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), samples[0]["masks"][0])


class _FixedProposals:
    """A stand-in model whose proposals are given boxes, best first."""

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, np.float32)

    def features(self, images):
        return images

    def rpn(self, features):
        return features, features

    def proposals(self, objectness, deltas, training=False):
        import tensorflow as tf

        batch = tf.shape(objectness)[0]
        boxes = tf.tile(tf.constant(self.boxes)[None], [batch, 1, 1])
        return boxes, tf.zeros(tf.shape(boxes)[:2]), tf.fill([batch], len(self.boxes))


def test_proposal_recall_counts_covered_boxes(samples):
    # image 1 has boxes (2,3,30,20) and (30,30,60,50); image 2 has (10,10,40,40); image 3 none
    proposals = [[30, 30, 60, 50], [0, 0, 5, 5], [10, 10, 40, 41], [2, 3, 30, 21]]
    recall = evaluate.proposal_recall(_FixedProposals(proposals), samples, counts=(1, 3, 4))
    # top 1 covers the second box of image 1 only; top 3 adds image 2's box; top 4 all three
    assert recall == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 4: pytest.approx(1.0)}
