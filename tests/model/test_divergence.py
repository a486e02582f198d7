"""A stage whose loss goes non-finite, or far above its start, stops at that step (issue 18)."""

import math

import pytest
import torch

from lego import FitConfig
from lego.errors import TrainingDiverged
from lego.training.loop import DivergenceGuard
from tests.model.test_resume import setup


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_whatever_the_factor(loss):
    guard = DivergenceGuard(None)
    guard.check(1, 5.0)
    with pytest.raises(TrainingDiverged, match=f"the training loss is {loss} at step 2"):
        guard.check(2, loss)


def test_a_loss_far_above_its_start_stops_and_one_below_does_not():
    guard = DivergenceGuard(3.0)
    for step, loss in enumerate([5.0, 9.0, 14.9, 2.0], start=1):
        guard.check(step, loss)  # a spike under 3x the first step's loss is training, not divergence
    with pytest.raises(TrainingDiverged, match=r"15.1 at step 5 is more than 3x the first step's 5"):
        guard.check(5, 15.1)
    DivergenceGuard(None, start=5.0).check(6, 1e6)  # factor None: only non-finite losses stop


def test_a_nan_in_the_weights_stops_the_stage_at_its_first_step_before_any_update():
    model, train, val = setup()
    block = model.blocks[0]
    with torch.no_grad():
        block.layers[0].attn.wqkv.weight[:, 0] = math.nan  # a forward that makes NaN logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    with pytest.raises(TrainingDiverged, match="at step 1"):
        block.fit(train, val, FitConfig(batch_size=8, warmup_steps=1), embedding=model.embedding,
                  callback=lambda event: steps.append(event))  # fmt: skip
    assert steps == []  # stopped before the step was taken or reported
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_a_huge_learning_rate_diverges_within_a_few_steps():
    model, train, val = setup()
    with pytest.raises(TrainingDiverged, match=r"more than 3x the first step's|is nan"):
        model.blocks[0].fit(train, val, FitConfig(batch_size=4, warmup_steps=1, lr=50.0, epochs=5),
                            embedding=model.embedding)  # fmt: skip
