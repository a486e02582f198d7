"""Handing freed memory back to the OS.

glibc's malloc keeps the memory of freed objects in its heap for reuse, and a phase that builds and drops many of
them leaves that heap resident although nothing uses it: tokenizing 32M byte tokens (Python strings, id lists,
Arrow batches) left about 270 MB so, more the larger the corpus, and a selection's chunked temporaries another
hundred. `malloc_trim(0)` returns the free pages; where there is none (macOS, musl) this is a no-op. Arrow (under
`datasets`) keeps a pool of its own (mimalloc or jemalloc): loading 64 MB of text left ~130 MB in it, released too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free memory to the OS (glibc; elsewhere nothing), and Arrow's if it is loaded."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    arrow = sys.modules.get("pyarrow")  # never imported here: model code runs without it
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
