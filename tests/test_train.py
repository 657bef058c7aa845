"""Training reliability: determinism, the NaN guard, kill-and-resume, the command line's errors.

Budgets are tiny (a few steps of a 64x64 model): these test the plumbing; the quality bars
are measured by the real commands (see the README).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import keras
import tensorflow as tf

from conftest import tiny_config
from minimask import train
from minimask.cli import main as cli_main
from synthetic_data import MnistDetection


def _source(config, n=16, seed=0):
    return MnistDetection("train", n, seed, image_size=config.image_size, max_digits=3, digit_size=(14, 30))


def test_same_seed_same_training_curve(tmp_path):
    config = tiny_config(checkpoint_every=100)
    curves = []
    for run in ("a", "b"):
        train.run(config, str(tmp_path / run), train_source=_source(config), steps=6, verbose=0, evaluate=False)
        with open(tmp_path / run / "history.json") as f:
            curves.append(json.load(f))
    assert curves[0]["step"] == curves[1]["step"] and len(curves[0]["step"]) > 0
    for name in ("rpn_class", "class", "mask"):
        np.testing.assert_array_equal(curves[0][name], curves[1][name], err_msg=name)
    assert os.path.exists(tmp_path / "a" / "loss_curves.png")
    assert json.load(open(tmp_path / "a" / "checkpoints" / "state.json"))["step"] == 6


def test_one_image_dataset_trains(tmp_path):
    config = tiny_config()
    model, _ = train.run(config, str(tmp_path / "one"), train_source=_source(config, n=1), steps=3, verbose=0,
                         evaluate=False)
    assert int(model.optimizer.iterations.numpy()) == 3


def test_exploding_learning_rate_is_stopped_by_the_nan_guard(tmp_path):
    config = tiny_config(optimizer="sgd", learning_rate=1e12, clipnorm=0.0, warmup_steps=0, checkpoint_every=1)
    run_dir = tmp_path / "nan"
    with pytest.raises(train.TrainingError, match=r"non-finite loss at step \d+: .*") as err:
        train.run(config, str(run_dir), train_source=_source(config), steps=40, verbose=0, evaluate=False)
    message = str(err.value)
    step = int(message.split("at step ")[1].split(":")[0])
    assert any(name in message for name in ("rpn_class", "rpn_box", "class", "box", "mask", "gradient"))
    # the offending batch is saved, and the last checkpoint is the last good step, loadable
    saved = np.load(run_dir / "nan_batch.npz")
    assert saved["image"].shape == (config.batch_size, 64, 64, 3)
    state = json.load(open(run_dir / "checkpoints" / "state.json"))
    assert state["step"] == step - 1
    restored = keras.models.load_model(str(run_dir / "checkpoints" / "last.keras"))
    assert all(np.all(np.isfinite(w)) for w in restored.get_weights())


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from minimask import train
    from synthetic_data import MnistDetection
    config = tiny_config(checkpoint_every=3, steps_per_epoch=100)
    source = MnistDetection("train", 16, 0, image_size=64, max_digits=3, digit_size=(14, 30))
    train.run(config, {run_dir!r}, train_source=source, steps=400, verbose=0, evaluate=False)
""")


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run_dir = str(tmp_path / "killed")
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), run_dir=run_dir)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = os.path.join(run_dir, "checkpoints", "state.json")
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.exists(state_path) and json.load(open(state_path))["step"] >= 6:
                break
            assert proc.poll() is None, "the training process ended before it was killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at step >= 6 within 240 s")
        proc.send_signal(signal.SIGKILL)  # mid-epoch, possibly mid-write
    finally:
        proc.wait()
    assert not os.path.exists(os.path.join(run_dir, "model.keras"))
    step = json.load(open(state_path))["step"]
    # no half-written file: the checkpoint loads, whatever moment the kill came
    keras.models.load_model(os.path.join(run_dir, "checkpoints", "last.keras"))
    config = tiny_config(checkpoint_every=3, steps_per_epoch=100)
    with pytest.raises(train.TrainingError, match="different config"):
        train.run(config.replace(seed=1), run_dir, train_source=_source(config), steps=400, resume=True, verbose=0)
    with pytest.raises(train.TrainingError, match="already holds a run"):
        train.run(config, run_dir, train_source=_source(config), steps=400, verbose=0)
    model, _ = train.run(config, run_dir, train_source=_source(config), steps=step + 4, resume=True,
                         verbose=0, evaluate=False)
    # the step count continues from the checkpoint
    assert int(model.optimizer.iterations.numpy()) == step + 4


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--run", "/nonexistent/run"], "does not exist"),
    (["train", "--train-json", "x.json"], "go together"),
    (["train", "--config", "nope", "--steps", "1", "--out", "/tmp/x"], "unknown config"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_cli_bad_coco_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli_main(["train", "--train-json", str(bad), "--train-images", str(tmp_path), "--out",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.json" in err and "\n" not in err


def test_time_budget_fits_the_schedule_and_stops_on_it(tmp_path):
    config = tiny_config(warmup_steps=2, checkpoint_every=1000)
    # one minute: the first step (graph tracing) takes tens of seconds on a loaded machine
    model, _ = train.run(config, str(tmp_path / "timed"), train_source=_source(config), minutes=1.0, verbose=0,
                         evaluate=False)
    state = json.load(open(tmp_path / "timed" / "checkpoints" / "state.json"))
    # the horizon was measured after the warm-up, and training stopped exactly there
    assert state["total_steps"] is not None and state["total_steps"] > 30
    assert state["step"] == state["total_steps"] == int(model.optimizer.iterations.numpy())
    assert state["elapsed"] < 60 * 1.2


def test_time_budget_refits_the_horizon_when_the_steps_slow_down(monkeypatch):
    """A fake clock: steps take 1 s, then 2 s from step 200 on, in a 600 s budget.  The first fit
    (after 100 steps) and the refit at 1/3 of the budget see 1 s a step and aim at step 600; the
    refits at 2/3 and 0.9 measure 2 s a step since the previous fit, which leaves exactly 400 steps."""
    clock = {"now": 0.0}
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock["now"])
    schedule = train.WarmupCosine(1e-3, 10, 10**6)
    budget = train.TimeBudget(10.0, schedule)
    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.Variable(0, dtype=tf.int64)),
                                  stop_training=False)
    budget.set_model(model)
    budget.on_train_begin()
    horizons = {}  # step -> the horizon right after it
    while not model.stop_training:
        step = int(model.optimizer.iterations.numpy()) + 1
        clock["now"] += 1.0 if step <= 200 else 2.0
        model.optimizer.iterations.assign(step)
        budget.on_train_batch_end(step)
        horizons[step] = budget.total_steps
    assert horizons[100] is None and horizons[101] == 600  # first fit: 100 steps after the first
    assert horizons[299] == 600 and horizons[300] == 400  # 2/3 of the budget: 400 s at step 300
    assert step == budget.total_steps == int(schedule.total_steps.numpy()) == 400
    assert clock["now"] == 600.0  # stopped by the fitted horizon, on the budget, not by the safety net


def test_four_step_schedule_trains_each_part_in_its_step(tmp_path, monkeypatch):
    """Ren et al. 2015, Sec. 3.2: 1 backbone + RPN; 2 a fresh detector (backbone + heads) on the
    step-1 proposals; 3 the RPN head alone; 4 the heads alone. Watch which weights each step moves."""
    config = tiny_config(checkpoint_every=100)
    parts = {"backbone": "backbone_fpn", "rpn": "rpn_head", "box": "box_head", "mask": "mask_head"}
    calls = []
    real_fit = train.fit

    def watched_fit(model, batches, config, run_dir, *, stage="joint", proposal_model=None, **kwargs):
        before = {p: [w.copy() for w in getattr(model, a).get_weights()] for p, a in parts.items()}
        history = real_fit(model, batches, config, run_dir, stage=stage, proposal_model=proposal_model, **kwargs)
        moved = {p for p, a in parts.items()
                 if any(not np.array_equal(b, w) for b, w in zip(before[p], getattr(model, a).get_weights()))}
        calls.append((stage, moved, proposal_model is not None, history["step"]))
        return history

    monkeypatch.setattr(train, "fit", watched_fit)
    model, _ = train.run(config, str(tmp_path / "alt"), train_source=_source(config), steps=8,
                         schedule="alternating", verbose=0, evaluate=False)
    assert [(stage, moved, fixed) for stage, moved, fixed, _ in calls] == [
        ("rpn", {"backbone", "rpn"}, False),
        ("detector", {"backbone", "box", "mask"}, True),  # proposals of the fixed step-1 network
        ("rpn_finetune", {"rpn"}, False),
        ("heads_finetune", {"box", "mask"}, False),
    ]
    assert all(len(steps) == 2 for *_, steps in calls)  # a quarter of the budget each
    with open(tmp_path / "alt" / "history.json") as f:
        assert json.load(f)["step"] == list(range(1, 9))
    # the returned model is the trained detector, and the joint stage is restored for later use
    assert model.stage == "joint" and model.proposal_model is None
    images = np.zeros((1, 64, 64, 3), np.uint8)
    assert np.isfinite(model(images)["scores"].numpy()).all()
