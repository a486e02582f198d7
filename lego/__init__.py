"""LEGO: block-by-block pre-training of transformer LMs with TRUE token-level early exit.

Model code (this package's top level, the block-training loop `lego.training` and the methods on it: `lego.fitting`,
LEGO's own, and `lego.methods`) depends on torch, numpy and safetensors only.
"""

from lego.fitting import FitConfig, FitStats
from lego.model import ExitStats, LEGOBlock, LEGOConfig, LEGOTransformer
from lego.moe import MoEConfig, RoutingTally
from lego.training_data import TrainingData

__all__ = [
    "ExitStats", "FitConfig", "FitStats", "LEGOBlock", "LEGOConfig", "LEGOTransformer", "MoEConfig", "RoutingTally",
    "TrainingData",
]  # fmt: skip
