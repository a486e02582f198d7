"""Helpers that launch real `train.py` runs in a subprocess, as users do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_train(*args: str, cache_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` with progress bars off, offline, and its own cache; flags such as -m first."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    env = {
        **os.environ,
        "LEGO_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_SILENT": "true",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags, "trainer.progress=false", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lego-cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """One `+experiment=tiny` run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
