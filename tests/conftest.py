"""Fixtures shared by every test folder."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session: the corpus is tokenized once, whichever test comes first."""
    return tmp_path_factory.mktemp("lego-cache")
