"""At most one host sync per optimizer step (issue 23): a dense training step (Block 0, every token active) reads
nothing from the device; its losses are summed there and read in one read every `log_every_steps` steps, at each
validation and at each step checkpoint. A diverged step is caught on the device: its update is skipped and the
next read raises.

On the CPU nothing waits for a device, so a sync is counted as what would be one on CUDA: a call that turns a
tensor into Python values (`SYNCING`), patched on `torch.Tensor` while the loop trains."""

import math
import warnings
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from lego import FitConfig, TrainingData
from lego.errors import TrainingDiverged
from lego.fitting import BlockMethod
from lego.training.loop import train_loop
from lego.training.selection import select_hard
from tests.model.test_resume import setup

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy")
# The sparse path's own reads, whose shapes depend on the data: LEGOBlock.run tests the mask (all, any) and the
# layout (SparseLayout.from_mask) takes the active tokens' indices (nonzero) and the longest row (int).
SPARSE_SYNCS = {"__bool__": 2, "nonzero": 1, "__int__": 1}
CONFIG = dict(epochs=1, batch_size=4, warmup_steps=1, evals_per_epoch=1, hard_ratio=None, log_every_steps=5)


@contextmanager
def counting_syncs():
    """The names of the syncing calls made inside, in order."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counted(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def model_and_data(sequences: int = 48):
    return setup(sequences)


def syncs_per_step(block, train, val, embedding, **overrides) -> dict[int, list[str]]:
    """{step: the syncing calls made since the previous step's event} over a `train_loop` of `block`."""
    config = FitConfig(**{**CONFIG, **overrides})
    per_step, seen = {}, [0]

    def record(event: dict) -> None:
        if event["kind"] == "step":
            per_step[event["step"]] = calls[seen[0] :]
            seen[0] = len(calls)

    method = BlockMethod(block, train, val, config, embedding)
    with counting_syncs() as calls:
        train_loop(method, config, callback=record)
    return per_step


def test_a_dense_step_reads_nothing_and_a_logged_one_reads_once():
    model, train, val = model_and_data()
    per_step = syncs_per_step(model.blocks[0], train, val, model.embedding)
    assert sorted(per_step) == list(range(1, 13))
    logged = {1, 5, 10}  # the first step, then every log_every_steps
    for step in logged - {1}:  # (step 1's interval also holds the epoch's start: the shuffled rows' nonzero)
        assert per_step[step] == ["tolist"], step  # the step's losses, gradient norm and divergence flag at once
    quiet = [per_step[step] for step in sorted(per_step) if step not in logged]
    assert len(quiet) == 9 and sum(map(len, quiet)) / len(quiet) <= 1 and max(map(len, quiet)) <= 1, quiet


@pytest.mark.cuda
def test_on_cuda_a_dense_step_between_reads_does_not_synchronize():
    """The same on a GPU, where CUDA reports every synchronizing call itself (`torch.cuda.set_sync_debug_mode`)."""
    model, train, val = model_and_data()
    model.cuda()
    config = FitConfig(**CONFIG)
    per_step, seen = {}, [0]

    def record(event: dict) -> None:
        if event["kind"] == "step":
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            per_step[event["step"]], seen[0] = len(syncs) - seen[0], len(syncs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_loop(BlockMethod(model.blocks[0], train, val, config, model.embedding), config, callback=record)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    quiet = [count for step, count in per_step.items() if step not in (1, 5, 10)]
    assert len(quiet) == 9 and max(quiet) <= 1, per_step


def test_a_sparse_step_syncs_only_for_its_layout():
    """Block 1 on Block 0's hard tokens: the data-dependent reads of the sparse path, nothing else."""
    model, train, val = model_and_data()
    block = model.blocks[0]
    with torch.no_grad():
        confidence = block.run(model.embedding(train.input_ids), None).confidence
        hidden = block.run(model.embedding(train.input_ids), None).hidden
    hard = TrainingData(hidden, train.targets, select_hard(confidence, train.active, 0.5))
    per_step = syncs_per_step(model.blocks[1], hard, hard, None)
    quiet = [Counter(calls) for step, calls in per_step.items() if step not in (1, 5, 10)]
    assert quiet and all(calls == SPARSE_SYNCS for calls in quiet), quiet


def test_reading_the_losses_every_step_or_every_ten_gives_the_same_numbers():
    results = []
    for every in (1, 10):
        model, train, val = model_and_data()
        events = []
        config = FitConfig(**{**CONFIG, "evals_per_epoch": 3, "log_every_steps": every})
        _, stats = model.blocks[0].fit(train, val, config, embedding=model.embedding, callback=events.append)
        results.append((model.state_dict(), stats.evals, {e["step"]: e for e in events if "lm_loss" in e}))
    (weights_1, evals_1, logged_1), (weights_10, evals_10, logged_10) = results
    assert all(torch.equal(weights_1[key], weights_10[key]) for key in weights_1)
    assert evals_1 == evals_10 and len(evals_1) == 3
    assert sorted(logged_10) == [1, 10] and all(logged_1[step] == logged_10[step] for step in logged_10)
    curve = [row["step_losses"] for row in evals_1]  # every step's loss, read at the validations
    assert curve == [[logged_1[s]["lm_loss"] for s in range(first, first + 4)] for first in (1, 5, 9)]


class Diverging(BlockMethod):
    """Block 0 whose step `at` alone has its loss multiplied by `factor` (a NaN, or a spike)."""

    def __init__(self, *args, at: int, factor: float) -> None:
        super().__init__(*args)
        self.at, self.factor, self.steps = at, factor, 0

    def step(self, batch, epoch):
        step = super().step(batch, epoch)
        self.steps += 1
        if self.steps == self.at:
            step.loss, step.lm_loss = step.loss * self.factor, step.lm_loss * self.factor
        return step


@pytest.mark.parametrize(
    "factor,message", [(math.nan, "the training loss is nan at step 4"), (10.0, r"at step 4 is more than 3x")]
)
def test_a_diverged_step_between_reads_never_reaches_the_weights(factor, message):
    """Step 4 diverges, the read at step 5 raises for it: step 4's update and step 5's were skipped on the
    device, so the weights are exactly those after step 3, and finite."""
    model, train, val = model_and_data()
    config = FitConfig(**CONFIG)
    method = Diverging(model.blocks[0], train, val, config, model.embedding, at=4, factor=factor)
    seen, after_3 = [], {}

    def record(event: dict) -> None:
        seen.append(event["step"])
        if event["step"] == 3:
            after_3.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(TrainingDiverged, match=message):
        train_loop(method, config, callback=record)
    assert seen == [1, 2, 3, 4]  # step 4 was not read (no sync); step 5's read raised before its event
    assert all(torch.equal(value, after_3[key]) for key, value in model.state_dict().items())
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_the_threshold_is_a_number_the_buffer_keeps_and_loads():
    model, train, _ = model_and_data()
    block = model.blocks[0]
    block.threshold = 0.3
    assert block.threshold == float(torch.tensor(0.3)) == float(block.threshold_)  # the float32 value
    other, _, _ = model_and_data()
    other.load_state_dict(model.state_dict())
    assert other.blocks[0].threshold == block.threshold
    h = model.embedding(train.input_ids[:4])
    with counting_syncs() as calls, torch.no_grad():
        out = other.blocks[0].run(h, None, logits_for="active")
    assert calls == []  # the dense path and the exit decision read nothing
    assert torch.equal(out.should_exit, out.confidence >= other.blocks[0].threshold_)


def test_a_universal_joint_step_reads_nothing_between_logged_steps():
    """The Universal joint training (every layer's loss as a logged term) through the same loop: its per-layer losses
    stay on the device with the rest."""
    from lego.methods.universal import JointTraining, UniversalConfig, UniversalTrainer
    from lego.training.loop import LoopConfig

    torch.manual_seed(0)
    trainer = UniversalTrainer(UniversalConfig.preset("lpt"), vocab_size=30)
    model = trainer.create_model(dim=16, num_heads=2, num_layers=3, max_seq_len=8)
    _, train, val = model_and_data()
    config = LoopConfig(epochs=1, batch_size=4, warmup_steps=1, patience=None, log_every_steps=5)
    per_step, seen = {}, [0]

    def record(event: dict) -> None:
        if event["kind"] == "step":
            per_step[event["step"]], seen[0] = calls[seen[0] :], len(calls)

    with counting_syncs() as calls:
        train_loop(JointTraining(trainer, model, train, val, max_epochs=1), config, callback=record)
    quiet = [per_step[step] for step in sorted(per_step) if step not in (1, 5, 10)]
    assert len(quiet) == 9 and max(map(len, quiet)) == 0, quiet
