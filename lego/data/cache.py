"""Cache keys and crash-safe writes for everything the data pipeline stores on disk.

Every cache entry is one file named by a hash of what it was derived from, written under a temporary
name and moved into place with `os.replace`, so an interrupted run never leaves a half-written entry
that a later run would trust.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Bump when the meaning of a cached file changes, so old entries are no longer picked up.
CACHE_VERSION = 1


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (config values, fingerprints)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then atomically rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
