"""Fixtures of the pipeline tests: a shared cache and one `+experiment=tiny` run read by several tests."""

from pathlib import Path

import pytest

from tests.launch import run_train


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """One `+experiment=tiny` run shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
