"""Universal Training Framework, at the seed's import path: `from experiments.universal_trainer import
UniversalConfig, UniversalTrainer, AlphaSchedule` (usage: `lego.methods.universal`'s docstring, docs/universal.md).

The method is part of the package, `lego.methods.universal` (on the shared training loop, `lego.training.loop`),
and `method=universal` of the Hydra runner is built in (`lego.pipeline.universal`).
"""

from lego.methods.universal import (
    PRESETS,
    AlphaSchedule,
    LossParts,
    UniversalConfig,
    UniversalTrainer,
    distillation_loss,
)
from lego.pipeline.universal import train_from_run

__all__ = [
    "PRESETS", "AlphaSchedule", "LossParts", "UniversalConfig", "UniversalTrainer", "distillation_loss",
    "train_from_run",
]  # fmt: skip
