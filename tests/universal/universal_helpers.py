"""Helpers for the Universal tests: a tiny 3-layer model and its trainer."""

import torch

from experiments.universal_trainer import UniversalConfig, UniversalTrainer

VOCAB = 40


def make_trainer(config: UniversalConfig, num_layers: int = 3, seed: int = 0):
    """A trainer and its freshly built model (dim 16, 2 heads, seq <= 16)."""
    torch.manual_seed(seed)
    trainer = UniversalTrainer(config, vocab_size=VOCAB)
    return trainer, trainer.create_model(dim=16, num_heads=2, num_layers=num_layers, max_seq_len=16)
