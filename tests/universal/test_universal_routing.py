"""Routing at inference is TRUE early exit through the core model: the end points, a middle threshold,
and several exit layers (a token leaves at the first one where it is confident enough)."""

import math

import pytest
import torch

from experiments.universal_trainer import UniversalConfig
from lego.methods.universal import run_layers
from lego.model import logit_confidence
from tests.universal.universal_helpers import make_trainer


def routed(trainer, model, windows):
    trainer.configure_routing(model)
    with torch.no_grad():
        return model(windows[:, :-1], return_stats=True)[1]


def test_threshold_zero_sends_every_token_down_the_deep_path(windows):
    trainer, model = make_trainer(UniversalConfig.preset("asymmetric", routing_threshold=0.0))
    stats = routed(trainer, model, windows)
    assert model.blocks[0].threshold == math.inf
    assert stats.exit_counts == [0, 0, windows[:, :-1].numel()]
    assert stats.shallow_ratio == 0.0 and stats.compute_cost == 1.0


def test_threshold_one_sends_every_token_down_the_shallow_path(windows):
    trainer, model = make_trainer(UniversalConfig.preset("asymmetric", routing_threshold=1.0))
    stats = routed(trainer, model, windows)
    assert model.blocks[0].threshold == -math.inf
    assert stats.exit_counts == [windows[:, :-1].numel(), 0, 0]
    assert stats.active_counts[1:] == [0, 0]  # the later layers did no work at all
    assert stats.shallow_ratio == 1.0 and stats.compute_cost == pytest.approx(1 / 3)


@pytest.mark.parametrize("method", ["max_softmax", "entropy"])
def test_middle_threshold_exits_exactly_the_confident_tokens(windows, method):
    trainer, model = make_trainer(UniversalConfig.preset("lpt", confidence_method=method))
    with torch.no_grad():
        first = run_layers(model, windows[:, :-1], {1})[0]
    confidence = logit_confidence(first.logits, method).view(first.exit_logit.shape)
    threshold = float(confidence.median())
    trainer.config.routing_threshold = threshold
    stats = routed(trainer, model, windows)
    assert model.blocks[0].threshold == pytest.approx(threshold)
    assert torch.equal(stats.exit_block == 0, confidence >= threshold)
    assert 0 < stats.shallow_ratio < 1
    assert stats.compute_cost == pytest.approx((stats.exit_counts[0] + 3 * stats.exit_counts[2]) / (3 * 96))


def test_multi_exit_takes_the_first_confident_exit(windows):
    both = UniversalConfig.preset("lpt", exit_layers=[1, 2], exit_thresholds={1: 1.0, 2: 1.0})
    trainer, model = make_trainer(both, num_layers=4)
    assert routed(trainer, model, windows).exit_counts == [96, 0, 0, 0]

    trainer.config.exit_thresholds = {1: 0.0, 2: 1.0}
    assert routed(trainer, model, windows).exit_counts == [0, 96, 0, 0]

    # Thresholds in the middle: the medians of the confidences each exit layer sees.
    t1 = float(stats_all_deep(trainer, model, windows).confidences[0].median())
    trainer.config.exit_thresholds = {1: t1, 2: 0.0}
    t2 = float(routed(trainer, model, windows).confidences[1].median())
    trainer.config.exit_thresholds = {1: t1, 2: t2}
    stats = routed(trainer, model, windows)
    assert [block.threshold for block in model.blocks] == pytest.approx([t1, t2, math.inf, math.inf])
    assert torch.equal(stats.confidences[0] >= t1, stats.exit_block.flatten() == 0)
    reached_two = stats.exit_block >= 1  # exactly the tokens layer 1 let go
    assert stats.active_counts[1] == int(reached_two.sum()) == 96 - stats.exit_counts[0] > 0
    assert torch.equal(stats.confidences[1] >= t2, stats.exit_block[reached_two] == 1)
    assert stats.exit_counts[1] > 0 and stats.exit_counts[3] > 0


def stats_all_deep(trainer, model, windows):
    trainer.config.exit_thresholds = {1: 0.0, 2: 0.0}
    return routed(trainer, model, windows)
