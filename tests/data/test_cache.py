"""Crash-safe cache writes and stable keys."""

import pytest

from lego.atomic import atomic_write
from lego.data.cache import cache_key


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "entry.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"complete"))
    assert target.read_bytes() == b"complete"

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in target.parent.iterdir()] == ["entry.bin"]


def test_cache_key_is_stable_and_sensitive():
    assert cache_key("a", 1, 0.5) == cache_key("a", 1, 0.5)
    assert cache_key("a", 1, 0.5) != cache_key("a", 1, 0.25)
    assert len(cache_key("x")) == 16
