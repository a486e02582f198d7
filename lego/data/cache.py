"""Cache keys and crash-safe writes for everything the data pipeline stores on disk.

Every cache entry is one file named by a hash of what it was derived from, written under a temporary
name and moved into place with `os.replace`, so an interrupted run never leaves a half-written entry
that a later run would trust.
"""

import hashlib
import json

# Bump when the meaning of a cached file changes, so old entries are no longer picked up.
CACHE_VERSION = 1


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (config values, fingerprints)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
