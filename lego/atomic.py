"""Crash-safe file writes, shared by the model, data and pipeline code (no dependencies).

A file is written under a unique temporary name next to its target and moved into place with
`os.replace` (atomic on POSIX), so a killed run never leaves a half-written file that a later run
would trust; the temporary file is removed if writing fails.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then atomically rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
