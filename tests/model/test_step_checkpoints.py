"""Step checkpoints (issue 20): a stage killed between validations resumes from its last step checkpoint at the
same batch of the same epoch, without building the batches it had done, and ends exactly where an uninterrupted
one does: the same weights and the same validation rows (the steps since the last validation were saved too)."""

import pytest
import torch

from lego import FitConfig
from tests.model.test_resume import Interrupt
from tests.model.test_resume import setup as setup_sequences

# 80 sequences in batches of 8: 10 steps an epoch, a validation at the end of each
CONFIG = dict(epochs=2, batch_size=8, warmup_steps=1, evals_per_epoch=1, patience=10, hard_ratio=None,
              log_every_steps=4, checkpoint_every_steps=3)  # fmt: skip


def setup():
    return setup_sequences(80)


def fit(model, train, val, checkpoint=None, callback=None):
    config = FitConfig(**CONFIG, checkpoint_path=None if checkpoint is None else str(checkpoint))
    return model.blocks[0].fit(train, val, config, embedding=model.embedding, callback=callback)[1]


def test_a_stage_killed_mid_epoch_resumes_to_the_same_weights_and_rows(tmp_path):
    model, train, val = setup()
    reference = fit(model, train, val)
    weights = model.state_dict()

    ckpt = tmp_path / "stage.pt"

    def kill_after_step_14(event):
        if event["kind"] == "step" and event["step"] == 14:
            raise Interrupt

    model, train, val = setup()
    with pytest.raises(Interrupt):
        fit(model, train, val, ckpt, kill_after_step_14)
    saved = torch.load(ckpt, weights_only=True)["state"]
    assert saved["step"] == 12 and saved["epoch"] == 1  # the step checkpoint, not step 10's validation
    assert saved["period"]["step"] == 12 and len(saved["period"]["step_losses"]) == 2  # steps 11 and 12

    model, train, val = setup()
    built, steps = [], []
    select = train.select
    train.select = lambda rows: built.append(len(rows)) or select(rows)  # the training batches this process builds
    resumed = fit(model, train, val, ckpt, lambda e: steps.append(e["step"]) if e["kind"] == "step" else None)
    assert steps == list(range(13, 21))  # the rest of epoch 1, where it left off
    assert len(built) == 8  # batches 13-20 only: the two done in this epoch were skipped unbuilt
    assert resumed.evals == reference.evals  # the row at step 20 holds steps 11-20, as the uninterrupted one
    assert len(resumed.evals[-1]["step_losses"]) == 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_skipping_batches_leaves_the_same_order():
    _, train, _ = setup()
    batches = lambda **skip: train.batches(8, shuffle=True, generator=torch.Generator().manual_seed(3), **skip)  # noqa: E731
    every = [batch.input_ids for batch in batches()]
    rest = [batch.input_ids for batch in batches(skip=4)]
    assert len(rest) == len(every) - 4 and all(torch.equal(a, b) for a, b in zip(rest, every[4:], strict=True))
    assert list(batches(skip=len(every))) == []


def test_checkpoints_without_steps_between_validations(tmp_path):
    """`checkpoint_every_steps=None`: only the validations' checkpoints, as before."""
    model, train, val = setup()
    ckpt = tmp_path / "stage.pt"

    def kill_after_step_14(event):
        if event["kind"] == "step" and event["step"] == 14:
            raise Interrupt

    config = FitConfig(**{**CONFIG, "checkpoint_every_steps": None}, checkpoint_path=str(ckpt))
    with pytest.raises(Interrupt):
        model.blocks[0].fit(train, val, config, embedding=model.embedding, callback=kill_after_step_14)
    saved = torch.load(ckpt, weights_only=True)["state"]
    assert saved["step"] == 10 and saved["period"] is None
