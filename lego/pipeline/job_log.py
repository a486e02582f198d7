"""Hydra's job log (`<run dir>/train.log`) also holds what the run prints: the data summary, stage lines, the
results, warnings and errors, as the terminal finally shows them.

Hydra's log file only receives `logging` records, while the runner reports with `print`; `mirror_output` copies
stdout and stderr into it, line by line. A line redrawn with carriage returns (a progress bar) is kept as the
terminal ends up showing it, once, and a bar that erased itself leaves nothing.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lego.errors import LEGOError


@contextmanager
def mirror_output(log_path: str | Path | None) -> Iterator[None]:
    """Copy what is printed inside the block, and the traceback of an exception escaping it, to `log_path`
    (appended to); a no-op for None."""
    if log_path is None:
        yield
        return
    with open(log_path, "a", encoding="utf-8") as log:
        streams = sys.stdout, sys.stderr
        tees = [_Tee(stream, log) for stream in streams]
        sys.stdout, sys.stderr = tees
        try:
            yield
        except LEGOError:  # a user error: its one line is already printed (a sweep's job raises it on)
            raise
        except Exception:  # a user error exits with its one line already printed (SystemExit, not copied)
            for tee in tees:
                tee.close_line()
            traceback.print_exc(file=log)
            raise
        finally:
            for tee in tees:
                tee.close_line()
            sys.stdout, sys.stderr = streams


def hydra_job_log() -> Path | None:
    """The file Hydra's job logging writes to (`<run dir>/<job name>.log`), None when it writes none
    (`hydra/job_logging=disabled`)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return Path(files[0].baseFilename) if files else None


class _Tee:
    """A text stream that writes through to `stream` and copies each finished line to `log`."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self._stream, self._log = stream, log
        self._line, self._redrawn = "", False  # the unfinished line as shown, and whether a \r redrew it

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        *finished, rest = text.split("\n")
        for part in finished:
            self._add(part)
            self._copy_line()
        self._add(rest)
        return written

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def close_line(self) -> None:
        """Copy an unfinished last line."""
        if self._line:
            self._copy_line()

    def _add(self, part: str) -> None:
        if "\r" in part:  # a terminal keeps what follows the last carriage return
            self._line, self._redrawn = part.rsplit("\r", 1)[1], True
        else:
            self._line += part

    def _copy_line(self) -> None:
        if self._line.strip() or not self._redrawn:  # a bar that erased itself leaves no line
            self._log.write(self._line + "\n")
            self._log.flush()
        self._line, self._redrawn = "", False

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ... of the real stream
        return getattr(self._stream, name)
