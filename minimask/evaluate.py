"""Evaluation the way the field does it: COCO AP with pycocotools.

The model's detections (boxes in minimask's (y1, x1, y2, x2) convention, full-resolution
bool masks) are turned into the COCO *results* format -- ``bbox`` as ``[x, y, w, h]``,
``segmentation`` as RLE through ``pycocotools.mask.encode`` -- and scored by
``pycocotools.cocoeval.COCOeval`` for ``bbox`` and ``segm``.  Nothing about AP is
re-implemented here: the numbers are pycocotools' own.

Besides the summary (AP, AP50, AP75, APs, APm, APl) this module reads per-class AP and
the precision-recall curves out of ``COCOeval.eval["precision"]`` (shape
``[T IoU thresholds, R=101 recall points, K classes, A=4 area ranges, M=3 max dets]``)
and builds a confusion matrix by greedy IoU matching, to see *which* classes get confused.
"""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimask import boxes as box_ops
from minimask import data

SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_dict_from_samples(samples, category_names):
    """Samples (the minimask sample format, with ``image_id``) -> a COCO instance-segmentation dict.

    Used to evaluate on data generated on the fly; the same writer as the COCO export
    (:func:`minimask.data.sample_to_coco`).  Category ids are the class ids ``1..K``.
    """
    images, annotations = [], []
    for sample in samples:
        image, image_annotations = data.sample_to_coco(
            sample, f"{int(sample['image_id']):06d}.png", len(annotations) + 1)
        images.append(image)
        annotations.extend(image_annotations)
    return {"images": images, "annotations": annotations,
            "categories": data.coco_categories(category_names)}


def coco_from_dict(dataset):
    """An in-memory ``pycocotools.coco.COCO`` from a dict (its index printing silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco_results(image_ids, detections, coco_category_ids=None):
    """Detections -> the COCO results list ``[{image_id, category_id, bbox, score, segmentation}]``.

    ``detections[i]`` holds the valid detections of image ``image_ids[i]``:
    ``{"boxes": [D, 4] (y1, x1, y2, x2), "class_ids": [D], "scores": [D], "masks": bool [D, H, W]}``
    (``masks`` optional).  ``coco_category_ids[k]`` maps class id ``k`` to the dataset's
    category id (default: identity).
    """
    results = []
    for image_id, det in zip(image_ids, detections):
        xywh = box_ops.yxyx_to_coco_xywh(np.asarray(det["boxes"], np.float32).reshape(-1, 4))
        masks = det.get("masks")
        for j in range(len(xywh)):
            k = int(det["class_ids"][j])
            entry = {
                "image_id": int(image_id),
                "category_id": int(coco_category_ids[k]) if coco_category_ids is not None else k,
                "bbox": [round(float(v), 2) for v in xywh[j]],
                "score": round(float(det["scores"][j]), 5),
            }
            if masks is not None:
                entry["segmentation"] = data.encode_mask(masks[j])
            results.append(entry)
    return results


def evaluate_coco(coco_gt, results, iou_types=("bbox", "segm"), verbose=True):
    """Score COCO ``results`` against ``coco_gt`` with ``COCOeval``.

    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP},
    "precision": array [T, R, K] (all areas, 100 detections)}}``.  With ``verbose`` the
    pycocotools tables are printed.  No results at all scores 0 (not an error).
    """
    metrics = {}
    for iou_type in iou_types:
        kept = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not kept:
            metrics[iou_type] = {name: 0.0 for name in SUMMARY_NAMES}
            metrics[iou_type]["per_class"] = {}
            continue
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            coco_dt = coco_gt.loadRes(kept)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
        summary_text = io.StringIO()
        with contextlib.redirect_stdout(summary_text):
            evaluator.summarize()
        if verbose:
            print(f"--- {iou_type} ---")
            print(summary_text.getvalue().rstrip())
        stats = evaluator.stats
        # pycocotools reports -1 where an area range has no objects: None here, not a fake 0
        entry = {name: float(stats[i]) if stats[i] >= 0 else None for i, name in enumerate(SUMMARY_NAMES)}
        precision = evaluator.eval["precision"][:, :, :, 0, 2]  # [T, R, K], area "all", maxDets 100
        cat_ids = evaluator.params.catIds
        per_class = {}
        for k, cat_id in enumerate(cat_ids):
            p = precision[:, :, k]
            p = p[p > -1]
            per_class[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else 0.0
        entry["per_class"] = per_class
        entry["precision"] = precision
        metrics[iou_type] = entry
    return metrics


def summary(metrics):
    """The JSON-ready part of :func:`evaluate_coco`'s output: ``{"bbox": {"AP": ..}, "segm": {..}}``
    (``None`` for an area range without objects)."""
    return {
        iou_type: {name: None if values[name] is None else round(values[name], 4) for name in SUMMARY_NAMES}
        for iou_type, values in metrics.items()
    }


def confusion_matrix(ground_truths, detections, num_classes, iou_threshold=0.5, score_threshold=0.5):
    """Greedy matching of detections to ground truth by box IoU -> counts ``[K+1, K+1]``.

    Row = true class, column = predicted class; row 0 counts false positives (a detection
    matching no ground truth), column 0 missed ground truth.  Detections are taken by
    decreasing score; each ground-truth box is matched at most once, whatever its class.
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for gt, det in zip(ground_truths, detections):
        gt_boxes = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
        gt_classes = np.asarray(gt["class_ids"], np.int64)
        keep = np.asarray(det["scores"]) >= score_threshold
        det_boxes = np.asarray(det["boxes"], np.float32).reshape(-1, 4)[keep]
        det_classes = np.asarray(det["class_ids"], np.int64)[keep]
        order = np.argsort(-np.asarray(det["scores"])[keep], kind="stable")
        ious = box_ops.iou(det_boxes, gt_boxes).numpy() if len(det_boxes) and len(gt_boxes) else None
        matched = np.zeros(len(gt_boxes), bool)
        for d in order:
            best = -1
            if ious is not None:
                candidates = np.where(~matched, ious[d], -1.0)
                if candidates.max() >= iou_threshold:
                    best = int(candidates.argmax())
            if best >= 0:
                matched[best] = True
                matrix[gt_classes[best], det_classes[d]] += 1
            else:
                matrix[0, det_classes[d]] += 1
        for g in np.where(~matched)[0]:
            matrix[gt_classes[g], 0] += 1
    return matrix


def plot_precision_recall(metrics, iou_type="segm", class_names=None, iou_index=0, ax=None):
    """Precision-recall curve per class at one IoU threshold (index 0 = IoU 0.50)."""
    import matplotlib.pyplot as plt

    precision = metrics[iou_type]["precision"][iou_index]  # [R, K]
    recall = np.linspace(0.0, 1.0, precision.shape[0])
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    names = list(metrics[iou_type]["per_class"]) if class_names is None else list(class_names)
    for k in range(precision.shape[1]):
        p = precision[:, k]
        ax.plot(recall[p > -1], p[p > -1], label=names[k] if k < len(names) else str(k))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{iou_type}: precision-recall at IoU {0.5 + 0.05 * iou_index:.2f}")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_confusion_matrix(matrix, class_names, ax=None):
    """Draw :func:`confusion_matrix`'s counts; class 0 reads "none" (missed / false positive)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
    labels = ["none"] + [str(n) for n in class_names[1:]]
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return ax


def predict_source(model, source, batch_size=8, indices=None):
    """Run ``model.detect`` over ``source`` -> (samples' image ids, detections per image).

    ``source``: anything with ``len`` and ``source[i] -> sample`` (synthetic scenes or a
    :class:`minimask.data.CocoDataset`); images must have the model's input size.
    """
    indices = range(len(source)) if indices is None else indices
    image_ids, detections = [], []
    chunk = []
    for n, i in enumerate(indices):
        chunk.append(source[i])
        if len(chunk) == batch_size or n == len(indices) - 1:
            images = np.stack([s["image"] for s in chunk])
            detections.extend(model.detect(images))
            image_ids.extend(int(s["image_id"]) for s in chunk)
            chunk = []
    return image_ids, detections


def evaluate_model(model, source, batch_size=8, coco_gt=None, verbose=True):
    """COCO evaluation of ``model`` on ``source`` -> (metrics of :func:`evaluate_coco`, results list).

    The ground truth is ``coco_gt`` if given (e.g. ``COCO(json_path)`` of a COCO dataset; class
    ids are mapped back with ``source.coco_category_ids``), else built from the samples.
    """
    image_ids, detections = predict_source(model, source, batch_size)
    category_ids = getattr(source, "coco_category_ids", None)
    if coco_gt is None:
        samples = [source[i] for i in range(len(source))]
        coco_gt = coco_from_dict(coco_dict_from_samples(samples, source.category_names))
        category_ids = None
    results = detections_to_coco_results(image_ids, detections, category_ids)
    return evaluate_coco(coco_gt, results, verbose=verbose), results


def proposal_recall(model, source, counts=(10, 20, 50, 100), iou_threshold=0.5, batch_size=8, num_images=None):
    """Share of ground-truth boxes that some proposal covers at IoU >= ``iou_threshold``,
    keeping the best ``n`` proposals per image, for each ``n`` in ``counts`` -> ``{n: recall}``.

    The RPN's own measure of quality (Faster R-CNN Sec. 4.1, Fig. 2/3): the detector
    can only find an object that some proposal covers.  Uses the model's inference
    proposals (``rpn_post_nms_test`` of them, best first).
    """
    import tensorflow as tf

    n_images = len(source) if num_images is None else min(num_images, len(source))
    covered = {n: 0 for n in counts}
    total = 0

    @tf.function(reduce_retracing=True)
    def propose(images):
        features = model.features(images)
        objectness, deltas = model.rpn(features)
        return model.proposals(objectness, deltas, training=False)

    for start in range(0, n_images, batch_size):
        samples = [source[i] for i in range(start, min(start + batch_size, n_images))]
        boxes, _, num = propose(tf.constant(np.stack([s["image"] for s in samples])))
        boxes, num = boxes.numpy(), num.numpy()
        for b, sample in enumerate(samples):
            gt = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
            total += len(gt)
            if not len(gt) or not num[b]:
                continue
            ious = box_ops.iou(boxes[b, :num[b]], gt).numpy()  # [P, G], proposals best first
            for n in counts:
                covered[n] += int((ious[:n].max(axis=0) >= iou_threshold).sum())
    return {n: covered[n] / max(total, 1) for n in counts}
