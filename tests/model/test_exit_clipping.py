"""Every method with a learned confidence head clips its exit classifiers apart from the language model: the LM's
weights after a step do not depend on the exit classifier's loss (issue 19: Universal's trainer had drifted back to
one shared clip norm, under which a large exit loss shrank every LM step)."""

import pytest
import torch

from experiments.universal_trainer import UniversalConfig, UniversalTrainer
from lego import FitConfig, LEGOConfig, LEGOTransformer, TrainingData

VOCAB = 30


def _windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 9), generator=torch.Generator().manual_seed(seed))


def _lego_step(exit_loss_weight: float) -> torch.nn.Module:
    """One step of LEGO's Block 0 stage (embedding, block and head)."""
    torch.manual_seed(0)
    model = LEGOTransformer.from_config(LEGOConfig(vocab_size=VOCAB, dim=16, num_heads=2, layers_per_block=[1, 1]))
    config = FitConfig(max_steps=1, batch_size=8, lr=1e-2, warmup_steps=1, exit_loss_weight=exit_loss_weight)
    train, val = TrainingData.from_windows(_windows(16, 0)), TrainingData.from_windows(_windows(8, 1))
    model.blocks[0].fit(train, val, config, embedding=model.embedding)
    return model


def _universal_step(exit_loss_weight: float) -> torch.nn.Module:
    """One step of Universal's joint training with the learned confidence (the core exit classifiers)."""
    torch.manual_seed(0)
    config = UniversalConfig.preset("lpt", confidence_method="learned", exit_loss_weight=exit_loss_weight)
    trainer = UniversalTrainer(config, vocab_size=VOCAB)
    model = trainer.create_model(dim=16, num_heads=2, num_layers=3, max_seq_len=16)
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    trainer.train_epoch(model, _windows(16, 0), optimizer, batch_size=8, max_steps=1)
    return model


def _lm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "exit_classifier" not in name}


@pytest.mark.parametrize("train_one_step", [_lego_step, _universal_step], ids=["lego", "universal"])
def test_the_exit_loss_never_changes_the_language_models_step(train_one_step):
    without, heavy = train_one_step(0.0), train_one_step(1000.0)  # an exit loss whose gradient dwarfs the LM's
    for name, value in _lm_weights(without).items():
        assert torch.equal(value, _lm_weights(heavy)[name]), name
    exits = {name: p for name, p in without.named_parameters() if "exit_classifier" in name}
    trained = [name for name, p in heavy.named_parameters() if name in exits and not torch.equal(p, exits[name])]
    assert trained  # the exit loss did train the exit classifiers, on their own clip norm
