"""Cache keys, and one writer per cache entry, for everything the data pipeline stores on disk.

Every cache entry is named by a hash of what it was derived from. A file entry is written under a temporary
name and moved into place with `os.replace` (`lego.atomic`), so an interrupted run never leaves a half-written
entry that a later run would trust; a folder entry (the token files) is built under `<key>.partial` by the one
process that holds its lock, and renamed into place when complete.
"""

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent preparations of one entry are not guarded
    fcntl = None

# Bump when the meaning of a cached file changes, so old entries are no longer picked up.
# 2: token files (one flat array per split, memory-mapped) instead of one .npz per corpus.
CACHE_VERSION = 2


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (config values, fingerprints)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold `<entry>.lock` exclusively: a second process preparing the same entry waits here, then finds it done."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(f"{entry.name}.lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield
