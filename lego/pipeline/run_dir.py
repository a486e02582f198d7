"""Owning a run directory: one process at a time, never a user's folder, and only our own files removed.

- `claim(run_dir)` refuses a non-empty folder that is not a LEGO run directory (no `run_config.json`) before any
  work, so `hydra.run.dir=~/papers` cannot write into (or, after a bad override, delete) someone's files; Hydra's
  own bookkeeping (`.hydra/`, the job log) does not count.
- `RunLock` holds an OS file lock (`fcntl.flock` on `<run dir>/.lock`) for the whole run: a second process on the
  same directory is refused with one line naming the holder. The kernel drops the lock when its process dies, so
  a lock left by a killed run is stale by construction and the next run simply takes it.
- `remove_own_files(run_dir)` is the clean-up after bad input: it deletes what this process wrote, nothing else,
  and the folder itself only when that leaves it empty.
- Hydra rewrites `.hydra/*.yaml` for every command before LEGO sees it, so a command LEGO then refuses (another
  config on a run's folder) would leave the folder describing a run that never happened. `keep_hydra_record` copies
  an accepted command's record aside and `restore_hydra_record` puts it back after a refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from lego.atomic import atomic_write
from lego.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded there
    fcntl = None

LOCK_NAME = ".lock"
HYDRA_BOOKKEEPING = (".hydra",)  # and the job log, `*.log`
# What a run writes before its first stage (the only files a failed start can have left).
STARTUP_FILES = ("run_config.json", "tokenizer.json", "wandb", LOCK_NAME)
HYDRA_RECORD = "accepted"  # `.hydra/accepted/`: the record Hydra wrote for the last command the run accepted
PROCESS_STARTED = time.time()  # files modified since were written by this process (or by Hydra for it)


def claim(run_dir: Path) -> None:
    """Refuse, before any work, a run directory that holds files a LEGO run did not write."""
    if (run_dir / "run_config.json").is_file() or not run_dir.is_dir():
        return  # a LEGO run to resume, or a new folder
    foreign = sorted(p.name for p in run_dir.iterdir() if not _is_bookkeeping(p) and p.name not in STARTUP_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"{run_dir} is not a LEGO run directory (it holds {shown}); give hydra.run.dir a new or empty folder"
        )


def remove_own_files(run_dir: Path) -> None:
    """After bad input stopped a fresh run: remove the files this process wrote (its start-up files and Hydra's
    bookkeeping written since it started), then the folder if nothing else is left in it."""
    for path in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if (path.name in STARTUP_FILES or _is_bookkeeping(path)) and _written_by_us(path):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when empty


def keep_hydra_record(run_dir: Path) -> None:
    """This command is accepted: copy what Hydra wrote for it (`.hydra/*.yaml`) to `.hydra/accepted/`."""
    _copy_yaml(run_dir / ".hydra", run_dir / ".hydra" / HYDRA_RECORD)


def restore_hydra_record(run_dir: Path) -> None:
    """This command is refused: put back the record of the last accepted one (a run older than this feature has
    none to put back)."""
    _copy_yaml(run_dir / ".hydra" / HYDRA_RECORD, run_dir / ".hydra")


def _copy_yaml(source: Path, target: Path) -> None:
    for path in sorted(source.glob("*.yaml")):
        atomic_write(target / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))


class RunLock:
    """`with RunLock(run_dir):` holds the directory for this process; a second one gets a ConfigError."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._file = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run: the lock lives with the handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            restore_hydra_record(self.path.parent)  # Hydra rewrote it for this refused command
            raise ConfigError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, or give this one "
                "another hydra.run.dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing the handle releases the lock; the file stays, harmless
            self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def _is_bookkeeping(path: Path) -> bool:
    return path.name in HYDRA_BOOKKEEPING or (path.suffix == ".log" and path.is_file())


def _written_by_us(path: Path) -> bool:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return all(p.stat().st_mtime >= PROCESS_STARTED - 1 for p in files)
