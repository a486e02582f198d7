"""A real tiny sweep (two hard ratios x two seeds) shared by the report tests, and a headless browser."""

import shutil
from pathlib import Path

import pytest

from tests.launch import run_train

SWEEP = ("hard_ratio.value=0.3,0.6", "seed=0,1", "data.max_train_tokens=30000", "trainer.threshold_scan=[0.0,0.5]")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """`python train.py -m +experiment=tiny hard_ratio.value=0.3,0.6 seed=0,1 ...` (W&B offline)."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "2026-01-01_00-00-00"
    proc = run_train("-m", "+experiment=tiny", *SWEEP, f"hydra.sweep.dir={sweep_dir}", cache_dir=cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium, driven by Playwright (never a downloaded browser); skipped only where none is installed."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (CI installs it) to render the report")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()
