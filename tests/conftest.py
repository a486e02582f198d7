"""Fixtures and hooks shared by every test folder."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session: the corpus is tokenized once, whichever test comes first."""
    return tmp_path_factory.mktemp("lego-cache")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` need a CUDA device: without one they are skipped, with that reason."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: scripts/gpu_check.sh runs these checks on a GPU machine")
    for item in marked:
        item.add_marker(skip)
