"""Presets by name for any depth, and one-line ConfigErrors naming the `universal.*` key."""

import math

import pytest

from experiments.universal_trainer import PRESETS, UniversalConfig
from lego.errors import ConfigError
from lego.methods.universal_config import from_dict


def test_presets_for_three_layers():
    weights = {name: UniversalConfig.preset(name).layer_weights for name in PRESETS}
    assert weights["standard"] == {3: 1.0}
    assert weights["lpt"] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert weights["asymmetric"] == pytest.approx({1: 0.7, 3: 0.3})
    assert weights["deep_focus"] == pytest.approx({1: 0.3, 3: 0.7})
    assert weights["l2"] == pytest.approx({1: 0.7, 2: 0.3, 3: 0.3})


def test_presets_follow_the_depth():
    assert UniversalConfig.preset("lpt", num_layers=5).layer_weights == pytest.approx(dict.fromkeys(range(1, 6), 0.2))
    assert UniversalConfig.preset("asymmetric", num_layers=6).layer_weights == pytest.approx({1: 0.7, 6: 0.3})


def test_run_node_with_string_keys_and_end_points():
    config = from_dict({"preset": "lpt", "layer_lr_scales": {"1": 1, "3": 0.1}, "routing_threshold": 1.0}, 3)
    assert config.layer_lr_scales == {1: 1.0, 3: 0.1}
    assert config.exit_threshold(1) == -math.inf
    assert from_dict({"layer_weights": [0, 0, 1], "routing_threshold": 0}, 3).exit_threshold(1) == math.inf


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({"preset": "lpt", "colour": 1}, "universal.colour"),
        ({"preset": "wide"}, "universal.preset"),
        ({"layer_weights": {1: -1.0}}, "universal.layer_weights"),
        ({"layer_weights": {4: 1.0}}, "universal.layer_weights"),
        ({"preset": "lpt", "exit_layers": [3]}, "universal.exit_layers"),
        ({"preset": "lpt", "routing_threshold": 2}, "universal.routing_threshold"),
        ({"preset": "lpt", "confidence_method": "vibes"}, "universal.confidence_method"),
        ({}, "universal.layer_weights"),
        ({"alpha_schedule": {"kind": "linear", "foo": 1}}, "universal.alpha_schedule.foo"),
    ],
)
def test_bad_nodes_name_the_key(node, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(node, 3)
