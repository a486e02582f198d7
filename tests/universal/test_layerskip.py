"""LayerSkip-style training on top of the Universal joint training: layer dropout rising with depth, the early-exit
loss's curriculum, and the honest FLOPs of a step that skipped layers."""

import json

import pytest
import torch

from lego.errors import ConfigError
from lego.methods.universal import JointTraining, run_layers
from lego.methods.universal_config import UniversalConfig
from lego.training_data import TrainingData
from tests.launch import run_train
from tests.universal.universal_helpers import make_trainer


def test_drop_rates_rise_from_zero_to_the_configured_rate():
    rates = UniversalConfig.preset("rising", 4, layer_dropout=0.2).drop_rates(4)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))
    assert UniversalConfig.preset("rising", 4).drop_rates(4) == [0.0] * 4


def test_a_skipped_sequence_passes_the_layer_unchanged(windows):
    _, model = make_trainer(UniversalConfig.preset("rising"))
    x = windows[:4, :-1]
    kept = [None, torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)]
    outs = run_layers(model, x, {1, 2, 3}, kept)
    dense = run_layers(model, x, {1, 2, 3})
    assert outs[2] is None  # nobody ran layer 3
    assert outs[1].hidden.shape[0] == 2 and torch.allclose(outs[1].hidden, dense[1].hidden[[0, 2]], atol=1e-6)
    # sequences 1 and 3 skipped layer 2: what layer 3 would see is layer 1's output for them
    h = run_layers(model, x, set(), [None, torch.tensor([0, 2]), torch.tensor([0, 1, 2, 3])])[2].hidden
    expected_input = dense[0].hidden.clone()
    expected_input[[0, 2]] = dense[1].hidden[[0, 2]]
    assert torch.allclose(h, model.blocks[2].run(expected_input, None, logits_for="none").hidden, atol=1e-5)


def test_the_curricula_choose_the_layers_whose_loss_counts():
    weights = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    rotational = UniversalConfig(dict(weights), exit_curriculum="rotational", curriculum_period=2)
    assert rotational.curriculum(weights, 0, 0.0, 4) == {1: 0.1, 2: 0.0, 3: 0.3, 4: 0.4}
    assert rotational.curriculum(weights, 1, 0.0, 4) == {1: 0.0, 2: 0.2, 3: 0.0, 4: 0.4}
    gradual = UniversalConfig(dict(weights), exit_curriculum="gradual")
    assert gradual.curriculum(weights, 0, 0.0, 4) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.4}  # the last layer only
    assert gradual.curriculum(weights, 0, 0.5, 4) == {1: 0.0, 2: 0.0, 3: 0.3, 4: 0.4}
    assert gradual.curriculum(weights, 0, 1.0, 4) == weights
    with pytest.raises(ConfigError, match="exit_curriculum='sometimes' is unknown"):
        UniversalConfig(dict(weights), exit_curriculum="sometimes")
    with pytest.raises(ConfigError, match="layer_dropout works without distillation"):
        UniversalConfig(dict(weights), layer_dropout=0.1, self_distillation=0.5)


def test_a_dropped_step_counts_only_the_layers_work_it_did_and_is_reproducible(windows):
    config = UniversalConfig.preset("rising", layer_dropout=0.9)
    trainer, model = make_trainer(config)
    data = TrainingData.from_windows(windows[:8])
    method = JointTraining(trainer, model, data, None, max_epochs=1, seed=3)
    step = method.step(data, epoch=0)
    dense = JointTraining(make_trainer(UniversalConfig.preset("rising"))[0], model, data, None, 1).step(data, 0)
    assert step.flops[0] == dense.flops[0]  # the first layer never drops
    assert step.flops[2] < dense.flops[2]  # at rate 0.9 some of the 8 sequences skip the last layer
    rows = trainer.kept_rows(8, 3, 3 * 1_000_003, torch.device("cpu"))
    assert step.flops[2] == pytest.approx(dense.flops[2] * len(rows[2]) / 8)  # the step's own draw
    again = JointTraining(trainer, model, data, None, max_epochs=1, seed=3).step(data, epoch=0)
    assert torch.equal(again.lm_loss, step.lm_loss)  # same seed and step: the same sequences dropped


def test_layerskip_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=universal_tiny", "universal=layerskip", f"hydra.run.dir={run_dir}", "wandb=disabled",
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    first, last = results["blocks"][0], results["blocks"][-1]
    assert last["train_flops"] < first["train_flops"]  # the last layer was skipped by some sequences
    assert results["thresholds"][0] is not None and results["thresholds"][1] is not None  # exits after 1 and 2


def test_a_resumed_layerskip_run_continues_its_curriculum_and_draws(tmp_path):
    """Killed between checkpoints and resumed, the rotational curriculum and the layer-dropout draws go on at the
    step they stopped at: the final weights are those of an uninterrupted run."""
    from lego.training.loop import LoopConfig, train_loop

    config = dict(epochs=1, batch_size=4, warmup_steps=1, patience=None, log_every_steps=1, checkpoint_every_steps=2)
    data = TrainingData.from_windows(torch.randint(0, 40, (32, 13), generator=torch.Generator().manual_seed(1)))

    def train(checkpoint=None, stop_at=None):
        trainer, model = make_trainer(UniversalConfig.preset("rising", layer_dropout=0.5, exit_curriculum="rotational"))
        method = JointTraining(trainer, model, data, data, max_epochs=1, seed=1)

        def kill(event):
            if event["kind"] == "step" and event["step"] == stop_at:
                raise KeyboardInterrupt

        loop = LoopConfig(**config, checkpoint_path=None if checkpoint is None else str(checkpoint))
        train_loop(method, loop, callback=kill if stop_at else None)
        return model

    reference = train().state_dict()
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "ckpt.pt", stop_at=5)  # the checkpoint holds step 4
    resumed = train(tmp_path / "ckpt.pt").state_dict()
    assert all(torch.equal(resumed[key], value) for key, value in reference.items())
