"""Fixtures for the data tests: no test may touch the network, and every cache lives in tmp_path."""

import os

# Read by `datasets` and `huggingface_hub` at import time; set before either is imported when possible.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402

from lego.data.config import DataConfig, TokenizerConfig  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force offline mode even if another test module imported `datasets` before the variables were set,
    so hub lookups fail at once instead of retrying for half a minute."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _numbered_lines(n: int) -> str:
    return "".join(f"line {i:05d}: the quick brown fox jumps over the lazy dog\n" for i in range(n))


@pytest.fixture
def numbered_lines():
    """Text whose every line is unique ("line 00042: ..."), so a line tells where it came from."""
    return _numbered_lines


@pytest.fixture
def small_txt(tmp_path):
    """A ~60 kB text file of 1000 unique numbered lines."""
    path = tmp_path / "corpus" / "small.txt"
    path.parent.mkdir()
    path.write_text(_numbered_lines(1000), encoding="utf-8")
    return path


@pytest.fixture
def make_data():
    """Build a text_files DataConfig sized for tiny test corpora: short sequences, 2 kB spans."""

    def make(files: list, **overrides) -> DataConfig:
        fields = {"source": "text_files", "files": [str(f) for f in files], "seq_len": 16, "span_chars": 2000}
        return DataConfig(**(fields | overrides))

    return make


@pytest.fixture
def byte_tok() -> TokenizerConfig:
    return TokenizerConfig(kind="bytes")
