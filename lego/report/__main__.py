"""`python -m lego.report PATH... [--out DIR] [--title TEXT]`: the report of runs and sweeps (see lego.report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lego.errors import LEGOError
from lego.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lego.report",
        description="Summarise LEGO runs: summary.csv, summary_by_config.csv (mean, sd, n over seeds), report.html.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories and/or multirun (sweep) directories")
    parser.add_argument("--out", type=Path, help="where to write (default: the one PATH given)")
    parser.add_argument("--title", help="the page's title")
    args = parser.parse_args(argv)
    try:
        files = write_report(args.paths, args.out, args.title)
    except LEGOError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{files.runs} runs ({files.finished} finished): {files.summary}, {files.by_config.name}, {files.html.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
