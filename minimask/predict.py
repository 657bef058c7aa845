"""Prediction on image files: overlays and a COCO results file (``python -m minimask predict``).

Images of any size are letterboxed to the model's square input (:func:`minimask.data.letterbox_image`);
boxes are mapped back by the scale and masks pasted at the original resolution.
"""
import json
import os

import numpy as np
from PIL import Image

from minimask import data as data_lib
from minimask import evaluate as evaluate_lib
from minimask import postprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_images(inputs):
    """Files and folders -> sorted list of image paths; a missing path is an error."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths.extend(sorted(os.path.join(item, f) for f in os.listdir(item)
                                if f.lower().endswith(IMAGE_SUFFIXES)))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not paths:
        raise FileNotFoundError(f"no images found in {inputs}")
    return paths


def predict_image(model, image, score_threshold=0.5):
    """One uint8 RGB image of any size -> its detections in its own pixels (valid rows only)."""
    size = model.config.image_size
    padded, scale = data_lib.letterbox_image(image, size)
    out = model.predict_batch(padded[None])
    n = int(out["num_detections"][0])
    keep = out["scores"][0, :n] >= score_threshold
    height, width = image.shape[:2]
    boxes = out["boxes"][0, :n][keep] / scale  # back to the image's own pixels
    # each mask covers its box as predicted; the reported box is cut to the image (the letterbox
    # padding lies outside it)
    masks = postprocess.paste_masks(out["masks"][0, :n][keep], boxes, (height, width),
                                    model.config.mask_threshold).numpy()
    boxes = np.clip(boxes, 0.0, [height, width, height, width]).astype(np.float32)
    return {"boxes": boxes, "scores": out["scores"][0, :n][keep],
            "class_ids": out["class_ids"][0, :n][keep], "masks": masks}


def predict_files(model, config, paths, out_dir, score_threshold=0.5):
    """Detect in every file of ``paths``; write ``out_dir/<name>.png`` overlays and ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minimask import visualize

    os.makedirs(out_dir, exist_ok=True)
    results, written = [], []
    for image_id, path in enumerate(paths, start=1):
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except OSError as err:
            raise FileNotFoundError(f"cannot read image {path}: {err}") from err
        det = predict_image(model, image, score_threshold)
        for entry in evaluate_lib.detections_to_coco_results([image_id], [det]):
            entry["file_name"] = os.path.basename(path)
            results.append(entry)
        fig, ax = plt.subplots(figsize=(5, 5))
        visualize.draw_instances(ax, image, det["boxes"], det["class_ids"], det["masks"], det["scores"],
                                 class_names=list(config.class_names), title=os.path.basename(path))
        target = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        fig.savefig(target, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(target)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return written
