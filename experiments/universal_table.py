"""The Universal comparison table from a multirun: `python experiments/universal_table.py <sweep dir>`.

Reads every job's results.json (outputs/multirun/.../<job>/results.json) and prints one markdown row per
job, in job order: test PPL and accuracy with routing, shallow ratio, compute cost (the original metric)
and honest cost (K/V of kept tokens counted), full-depth PPL, the threshold scan's PPL at exit share 0.5
(half of the tokens reaching each non-last layer exit there: how good the early exits are whatever the
routing threshold), and wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(sweep_dir: Path) -> str:
    paths = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name.split("_")[0]))
    if not paths:
        raise SystemExit(f"no */results.json under {sweep_dir}")
    lines = [
        "| experiment | test PPL | accuracy | shallow ratio | compute cost | honest cost | full-depth PPL "
        "| scan PPL @ 0.5 | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        half = next((row["test_ppl"] for row in r["threshold_scan"] if row["target_exit_share"] == 0.5), None)
        half_text = "-" if half is None else f"{half:.2f}"
        lines.append(
            f"| {r['experiment_name']} | {r['test_ppl']:.2f} | {r['test_acc']:.3f} | {r['shallow_ratio']:.1%} | "
            f"{r['compute_cost']:.3f} | {r['honest_cost']:.3f} | {r['test_ppl_full_depth']:.2f} | {half_text} | "
            f"{r['wall_seconds']:.0f}s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    print(table(parser.parse_args().sweep_dir))
