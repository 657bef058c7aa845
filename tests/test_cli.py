"""The command line on a tiny trained run: evaluate, predict and export write what they promise."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from minimask import train
from minimask.cli import main as cli_main
from synthetic_data import MnistDetection
from synthetic_data.export import export_coco


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = tiny_config()
    path = str(tmp_path_factory.mktemp("cli") / "run")
    source = MnistDetection("train", 16, 0, image_size=64, max_digits=3, digit_size=(14, 30))
    train.run(config, path, train_source=source, steps=3, verbose=0, evaluate=False)
    return path


def test_evaluate_on_coco_files_writes_metrics_and_results(run_dir, tmp_path, capsys):
    paths = export_coco(str(tmp_path / "coco"), counts={"test": 6}, seed=1, image_size=64, max_digits=3,
                        digit_size=(14, 30))
    out = str(tmp_path / "eval")
    assert cli_main(["evaluate", "--run", run_dir, "--json", str(paths["test"]),
                     "--images", str(tmp_path / "coco" / "test"), "--out", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.load(open(os.path.join(out, "results.json")))
    assert isinstance(results, list)
    for entry in results:
        assert set(entry) >= {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert "Average Precision" in capsys.readouterr().out


def test_predict_writes_overlays_and_results(run_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    scenes = MnistDetection("test", 2, 0, image_size=96)  # another size: letterboxed to the model's
    # scene1 is cut to 96 x 40: its letterbox is mostly padding, where boxes may reach
    Image.fromarray(scenes[0]["image"]).save(folder / "scene0.png")
    Image.fromarray(scenes[1]["image"][:40]).save(folder / "scene1.png")
    sizes = {1: (96, 96), 2: (40, 96)}  # image id (file order, from 1) -> (height, width)
    out = str(tmp_path / "pred")
    assert cli_main(["predict", "--run", run_dir, str(folder), "--out", out, "--score-threshold", "0.0"]) == 0
    assert sorted(os.listdir(out)) == ["results.json", "scene0.png", "scene1.png"]
    results = json.load(open(os.path.join(out, "results.json")))
    assert {entry["image_id"] for entry in results} <= set(sizes)
    for entry in results:
        height, width = sizes[entry["image_id"]]
        x, y, w, h = entry["bbox"]  # in the original image's pixels, cut to the image
        assert 0 <= x and 0 <= y and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert entry["segmentation"]["size"] == [height, width]


def test_export_then_load_with_plain_tensorflow(run_dir, tmp_path):
    import tensorflow as tf

    out = str(tmp_path / "exported")
    assert cli_main(["export", "--run", run_dir, "--out", out]) == 0
    served = tf.saved_model.load(out)
    result = served.serve(tf.zeros([1, 64, 64, 3], tf.uint8))
    assert result["full_masks"].shape[-2:] == (64, 64)
    assert np.all(result["num_detections"].numpy() >= 0)


def test_predict_missing_image_is_one_line(run_dir, tmp_path, capsys):
    assert cli_main(["predict", "--run", run_dir, str(tmp_path / "nope.png"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope.png" in err
