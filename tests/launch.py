"""Launch real `python train.py ...` runs in a subprocess, as users do (shared by the end-to-end tests)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def offline_env(cache_dir: Path) -> dict[str, str]:
    """The environment of every launched run: offline, quiet W&B, its own cache, short errors."""
    env = {**os.environ, "LEGO_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["WANDB_SILENT"] = "true"
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("WANDB_SERVICE", None)  # each run its own W&B service, not the one a test process started
    return env


def run_train(*args: str, cache_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` with progress bars off, offline, and its own cache; flags such as -m first."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags, "trainer.progress=false", *overrides],
        cwd=REPO,
        env=offline_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
