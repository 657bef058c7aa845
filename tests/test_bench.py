"""The benchmark suite runs and writes what it promises (no timing is asserted: speed is bench/'s job).

The smallest section that builds a model, ``limits``, runs through the suite's own runner on the
tiny test config; the FLOP count it reports is checked against the layer arithmetic written out
by hand, and the suite's small helpers against known answers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.__main__ import SETTINGS, Suite, run_sections
from bench.common import format_table, growth_exponent
from bench.limits import multiply_adds
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def limits_run(tmp_path_factory):
    """``limits`` of the quick suite on the tiny config -> (suite, its limits.json, its suite.json)."""
    out = tmp_path_factory.mktemp("bench")
    suite = Suite(tiny_config(), SETTINGS[True], out_dir=str(out))
    run_sections(suite, ["limits"])
    with open(out / "limits.json") as f:
        limits = json.load(f)
    with open(out / "suite.json") as f:
        summary = json.load(f)
    return suite, limits, summary


def test_limits_section_writes_positive_numbers(limits_run):
    _, limits, summary = limits_run
    assert {"peaks", "peak_gflop_per_s", "flops", "gflop_per_image", "shares", "seconds", "machine"} <= set(limits)
    assert len(limits["peaks"]) == 3
    for row in limits["peaks"]:
        assert row["gflop"] > 0 and row["median_ms"] > 0 and row["gflop_per_s"] > 0
    assert limits["peak_gflop_per_s"] == max(row["gflop_per_s"] for row in limits["peaks"])
    assert [row["stage"] for row in limits["flops"]] == ["backbone", "FPN", "RPN head", "RoIAlign", "box head",
                                                         "mask head"]
    for row in limits["flops"]:
        assert row["inference_gflop"] > 0 and row["training_forward_gflop"] > 0
        assert row["training_step_gflop"] == pytest.approx(3 * row["training_forward_gflop"])
    assert [row["what"] for row in limits["shares"]] == ["training step", "inference, batch 2", "inference, batch 1"]
    for row in limits["shares"]:
        assert row["images_per_s"] > 0 and row["achieved_gflop_per_s"] > 0 and row["share_of_peak_percent"] > 0
    assert list(summary["sections"]) == ["limits"] and summary["seconds"] > 0 and summary["quick"] is True


def test_head_flops_match_the_layer_arithmetic(limits_run):
    """The box, mask and RPN head counts against the textbook formulas, on the tiny config."""
    suite, _, _ = limits_run
    model, _ = suite.model_and_batch()
    config = model.config
    counted = multiply_adds(model, box_rois=5, mask_rois=3)
    f, w, k = config.fpn_width, config.box_head_width, config.num_classes
    assert counted["box head"] == 5 * (7 * 7 * f * w + w * w + w * (k + 1) + w * 4 * k)  # fc1, fc2, logits, deltas
    m, mw = config.mask_pool_size, config.mask_head_width
    convs = m * m * 9 * (f * mw + (config.mask_head_convs - 1) * mw * mw)  # "same" 3x3 convs at m x m
    upsample = m * m * 4 * mw * mw  # each input cell feeds a 2x2 block through a 2x2 kernel
    logits = (2 * m) ** 2 * mw * k
    assert counted["mask head"] == 3 * (convs + upsample + logits)
    # a 3x3 conv and two 1x1 convs (3 and 12 channels) on every cell of P2..P6: 64 px -> 16, 8, 4, 2, 1
    cells = sum(n * n for n in (16, 8, 4, 2, 1))
    assert counted["RPN head"] == cells * (9 * f * f + f * 3 + f * 12)


def test_command_line_lists_the_sections():
    finished = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
    assert finished.returncode == 0
    for section in ("end_to_end", "stages", "scaling", "limits", "builtins", "xla", "variants", "--quick"):
        assert section in finished.stdout


def test_growth_exponent_recovers_a_power_law():
    sizes = np.array([128, 256, 512, 1024]) ** 2
    assert growth_exponent(sizes, 3.0 * sizes ** 1.0) == pytest.approx(1.0)
    assert growth_exponent(sizes, 0.5 * sizes ** 1.5) == pytest.approx(1.5)
    assert growth_exponent(sizes, np.full(4, 7.0)) == pytest.approx(0.0, abs=1e-9)


def test_format_table_aligns_columns_and_shows_missing_values():
    text = format_table([{"name": "a", "ms": 1.234}, {"name": "longer", "ms": None}],
                        [("name", "name", None), ("ms", "ms", ".1f")], "title")
    lines = text.split("\n")
    assert lines[0] == "title"
    assert len({len(line) for line in lines[1:]}) == 1  # every row as wide as the header
    assert lines[3].endswith("1.2") and lines[4].endswith("n/a")


def test_stages_of_a_mask_head_that_sees_the_pixels():
    """With ``mask_head_pixels`` the stage split still rebuilds the model: the mask head's stage
    gives the masks of ``model.call``, its FLOPs add the pixel convolution, and training runs."""
    import keras
    import tensorflow as tf
    from bench import stages
    from conftest import synthetic_batch
    from minimask.model import MaskRCNN
    keras.utils.set_random_seed(3)
    model = MaskRCNN(tiny_config(mask_head_pixels=4)).build_all()
    batch = synthetic_batch(model.config, (2, 1), seed=8)
    images = tf.constant(batch["image"])
    calls = stages.inference_calls(model, images)
    np.testing.assert_allclose(calls["mask head"]().numpy(), model(images)["masks"].numpy(), atol=1e-5)
    m, k, p = model.config.mask_pool_size, model.config.num_classes, 4
    with_pixels = multiply_adds(model, box_rois=5, mask_rois=3)["mask head"]
    plain = multiply_adds(MaskRCNN(tiny_config()).build_all(), box_rois=5, mask_rois=3)["mask head"]
    assert with_pixels - plain == 3 * (2 * m) ** 2 * (9 * 3 * p + p * k)  # the 3x3 pixel conv, p more logit inputs
    train_batch = {key: tf.constant(value) for key, value in batch.items()}
    out, grads = stages.training_calls(model, train_batch)["mask head"]()
    assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)
