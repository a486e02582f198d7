"""`release_freed_memory`: the C heap's free pages go back to the OS (glibc), so a phase that churned many small
objects (tokenizing a corpus) does not leave them resident for the rest of the run."""

import sys
from pathlib import Path

import pytest

from lego.memory import _malloc_trim, release_freed_memory


def rss_anon_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_freed_small_objects_are_returned_to_the_os():
    start = rss_anon_mb()
    churn = [bytes(1000) + str(i).encode() for i in range(250_000)]  # ~250 MB of objects from the C heap (> 512 B)
    survivor = churn[-1]  # the heap's top stays in use: freeing the rest does not shrink it
    del churn
    before = rss_anon_mb()
    assert before - start > 200  # freed, still resident
    release_freed_memory()
    assert before - rss_anon_mb() > 200, "the freed objects' pages stayed resident"
    assert survivor.endswith(b"249999")  # what is in use is untouched
