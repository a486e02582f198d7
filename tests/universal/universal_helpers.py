"""Helpers for the Universal tests: a tiny 3-layer model and a `train.py` launcher.

A module of its own (not conftest.py): tests/ has no packages, so every conftest.py is imported under the
same name and `from conftest import ...` could pick another folder's. tests/pipeline's launcher lives in
such a conftest, hence this small copy.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from experiments.universal_trainer import UniversalConfig, UniversalTrainer

REPO = Path(__file__).resolve().parents[2]
VOCAB = 40


def run_train(*overrides: str, cache_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEGO_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "trainer.progress=false", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_trainer(config: UniversalConfig, num_layers: int = 3, seed: int = 0):
    """A trainer and its freshly built model (dim 16, 2 heads, seq <= 16)."""
    torch.manual_seed(seed)
    trainer = UniversalTrainer(config, vocab_size=VOCAB)
    return trainer, trainer.create_model(dim=16, num_heads=2, num_layers=num_layers, max_seq_len=16)
