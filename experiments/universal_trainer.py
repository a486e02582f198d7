"""Universal Training Framework: LEGO's model trained jointly (every layer at once) instead of block by block.

    from experiments.universal_trainer import UniversalConfig, UniversalTrainer, AlphaSchedule

    config = UniversalConfig.preset("asymmetric", routing_threshold=0.95)  # or UniversalConfig({1: .7, 3: .3})
    trainer = UniversalTrainer(config, vocab_size=256)
    model = trainer.create_model(dim=128, num_heads=4, num_layers=3, max_seq_len=128)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, train_windows, optimizer, epoch=0, max_epochs=1)
    trainer.evaluate(model, test_windows)  # ppl, acc, shallow_ratio, compute_cost (TRUE early exit)

Importing this module registers `method=universal` with the Hydra runner (`python train.py
+experiment=universal_lpt`); see docs/universal.md. The code lives in `experiments/universal/`.
"""

from experiments.universal.config import PRESETS, AlphaSchedule, UniversalConfig
from experiments.universal.run import train_from_run
from experiments.universal.trainer import LossParts, UniversalTrainer, distillation_loss
from lego.pipeline.methods import register_method

register_method("universal", train_from_run)

__all__ = [
    "PRESETS", "AlphaSchedule", "LossParts", "UniversalConfig", "UniversalTrainer", "distillation_loss",
    "train_from_run",
]  # fmt: skip
