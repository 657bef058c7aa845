"""The benchmark suite runs and writes what it promises (no timing is asserted: speed is bench/'s job).

``python -m bench --quick --only limits`` is the smallest section that builds the model; the
FLOP count it reports is checked against the layer arithmetic written out by hand, and the
suite's small helpers against known answers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.common import format_table, growth_exponent
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def limits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    finished = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "limits", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    with open(out / "limits.json") as f:
        limits = json.load(f)
    with open(out / "suite.json") as f:
        suite = json.load(f)
    return limits, suite, finished.stdout


def test_limits_section_writes_positive_numbers(limits_run):
    limits, suite, stdout = limits_run
    assert {"peaks", "peak_gflop_per_s", "flops", "gflop_per_image", "shares", "seconds", "machine"} <= set(limits)
    assert len(limits["peaks"]) == 3
    for row in limits["peaks"]:
        assert row["gflop"] > 0 and row["median_ms"] > 0 and row["gflop_per_s"] > 0
    assert limits["peak_gflop_per_s"] == max(row["gflop_per_s"] for row in limits["peaks"])
    stages = [row["stage"] for row in limits["flops"]]
    assert stages == ["backbone", "FPN", "RPN head", "RoIAlign", "box head", "mask head"]
    for row in limits["flops"]:
        assert row["inference_gflop"] > 0 and row["training_forward_gflop"] > 0
        assert row["training_step_gflop"] == pytest.approx(3 * row["training_forward_gflop"])
    assert limits["shares"] == []  # no section measured images/s in this run
    assert list(suite["sections"]) == ["limits"] and suite["seconds"] > 0 and suite["quick"] is True
    assert "Model FLOPs per image" in stdout


def test_head_flops_match_the_layer_arithmetic():
    """The box and mask head counts against the textbook formulas, on a small config."""
    from bench.bench_model import build_model
    from bench.limits import multiply_adds

    config = tiny_config()
    model = build_model(config)
    counted = multiply_adds(model, box_rois=5, mask_rois=3)
    f, w, k = config.fpn_width, config.box_head_width, config.num_classes
    box = 5 * (7 * 7 * f * w + w * w + w * (k + 1) + w * 4 * k)  # fc1, fc2, class logits, box deltas
    m, mw = config.mask_pool_size, config.mask_head_width
    convs = m * m * 9 * (f * mw + (config.mask_head_convs - 1) * mw * mw)  # "same" 3x3 convs at m x m
    upsample = m * m * 4 * mw * mw  # each input cell feeds a 2x2 block through a 2x2 kernel
    logits = (2 * m) ** 2 * mw * k
    assert counted["box head"] == box
    assert counted["mask head"] == 3 * (convs + upsample + logits)
    # the RPN head: a 3x3 conv and two 1x1 convs on every cell of P2..P6 (64x64 image: 16, 8, 4, 2, 1)
    cells = sum(n * n for n in (16, 8, 4, 2, 1))
    assert counted["RPN head"] == cells * (9 * f * f + f * 3 + f * 12)


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
