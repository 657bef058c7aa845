"""The config: frozen, saved with every run, read back equal, unknown fields refused."""
import dataclasses

import pytest

from minimask.config import Config, get_config


def test_round_trip_through_json(tmp_path):
    config = get_config("mnist", seed=3, anchor_scales=((8, 12), (16, 24), (32, 48), (64, 96), (128, 192)))
    path = tmp_path / "config.json"
    config.save(path)
    assert Config.load(path) == config
    assert Config.from_dict(config.to_dict()) == config


def test_frozen_and_checked():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(ValueError, match="unknown fields"):
        Config.from_dict({**config.to_dict(), "learning_rat": 0.1})
    with pytest.raises(ValueError, match="unknown config"):
        get_config("imagenet")


@pytest.mark.parametrize("field, value", [("mask_threshold", 0.0), ("mask_threshold", 1.5), ("box_smooth_l1_beta", -1.0)])
def test_values_that_would_fail_silently_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("mnist", **{field: value})
