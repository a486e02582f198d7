"""Crash-safe file writes, shared by the model, data and pipeline code (no dependencies but lego.errors).

A file is written under a unique temporary name next to its target and moved into place with
`os.replace` (atomic on POSIX), so a killed run never leaves a half-written file that a later run
would trust; the temporary file is removed if writing fails, and `remove_stale_temporaries` removes the
ones a killed process left. The file gets the permissions the user's umask gives (`mkstemp` alone would
make it owner-only), and a full disk is a `DiskFullError` naming the file, never a bare C++ error.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lego.errors import DiskFullError

TEMP_SUFFIX = ".tmp"  # every temporary name is `.<target name>.<unique part>.tmp`
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20  # a failed write with less free space than this was the disk filling up


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then atomically rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        try:
            write(Path(tmp))
        except Exception as err:
            if is_disk_full(err, path.parent):
                raise disk_full(path) from err
            raise
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reserve_space(file: Path, nbytes: int, target: Path) -> None:
    """Allocate `nbytes` for `file` on disk now (a sparse file filled through a memory map would die of
    SIGBUS when the disk fills); a full disk is a DiskFullError naming `target` and the bytes it needs."""
    with open(file, "r+b") as f:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:  # no fallocate (macOS): at least refuse what cannot fit
                f.truncate(nbytes)
                if shutil.disk_usage(file.parent).free < nbytes:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as err:
            if err.errno in _DISK_FULL_ERRNOS:
                raise disk_full(target, nbytes) from err
            raise


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write was the disk filling up: ENOSPC/EDQUOT anywhere in the exception chain, or a
    library's own error (torch's C++ writer says only "file write failed") with the disk now nearly full."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full(path: Path, nbytes: int | None = None) -> DiskFullError:
    """The one-line error for a write of `path` (of `nbytes`, where known) that the disk cannot hold."""
    sizes = [f"{_megabytes(nbytes)} needed"] if nbytes is not None else []
    with contextlib.suppress(OSError):
        sizes.append(f"{_megabytes(shutil.disk_usage(path.parent).free)} free")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return DiskFullError(
        f"no space left on the device to write {path}{detail}; free some space (or move the run elsewhere) and "
        "re-run the same command to resume"
    )


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writes left under `folder` (never trusted, only wasting disk).
    Call it only while no other process writes there (the run directory's lock)."""
    stale = [p for p in folder.rglob(f".*{TEMP_SUFFIX}") if p.is_file() and "wandb" not in p.parts]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MB"
