"""Find the runs under some folders and read each one into a flat row: its overrides, its seed, its status
and its headline results.

A run directory is any folder holding `.hydra/`, `run_config.json` or `results.json` (what `train.py` writes);
a multirun folder, a study folder or a single run can all be given. Runs that failed or were stopped keep a
row with their status, so a sweep's report never hides a job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lego.common.runmeta import is_result_neutral, parse_overrides

# results.json scalars shown per run, in this order (per-block exit rates follow)
METRICS = ("test_ppl", "val_ppl", "test_ppl_full_depth", "test_acc", "shallow_ratio", "honest_cost",
           "compute_cost", "inference_speedup", "train_flops", "train_flops_vs_dense", "train_tokens_per_second",
           "train_mfu", "wall_seconds")  # fmt: skip


@dataclass
class Run:
    """One run directory, as the report sees it."""

    path: Path
    name: str  # path relative to the report's root
    overrides: dict[str, str]  # key -> value as typed on the command line ('+experiment' shown as 'experiment')
    seed: int | None
    status: str  # finished | failed: <reason> | diverged: <where> | incomplete: <what is done>
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def metrics(self) -> dict[str, float | None]:
        """The headline numbers (None where a run has none), per-block exit rates as exit_rate_block_<k>, and for
        MoE runs each layer's expert-load imbalance (`moe_imbalance_<layer>`, its max, the max dropped share)."""
        values = {key: _number(self.results.get(key)) for key in METRICS}
        for k, rate in enumerate(self.results.get("exit_rates") or []):
            values[f"exit_rate_block_{k}"] = _number(rate)
        moe = self.results.get("moe") or []
        for row in moe:  # MoE runs: each layer's load imbalance (max / mean slots per expert) on the test set
            values[f"moe_imbalance_{row['layer']}"] = _number(row.get("imbalance"))
        if moe:
            values["moe_imbalance_max"] = max(_number(row.get("imbalance")) or 0.0 for row in moe)
            values["moe_dropped_max"] = max(_number(row.get("dropped")) or 0.0 for row in moe)
        ltt = self.results.get("ltt")  # trainer.calibration=ltt: the promised risk (epsilon, delta), its test measure
        if ltt:
            values.update({f"ltt_{key}": _number(ltt.get(key)) for key in ("epsilon", "delta", "test_risk")})
        return values

    def config_key(self) -> tuple[tuple[str, str], ...]:
        """What identifies this run's config: every override but the seed and the result-neutral ones
        (`lego.common.runmeta`)."""
        return tuple((k, v) for k, v in self.overrides.items() if not (k == "seed" or is_result_neutral(k)))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory at or under `paths`, in natural order (job 10 after job 9), read into `Run`s."""
    runs: list[Run] = []
    for root in paths:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory; pass run or multirun folders")
        base = root if not is_run_dir(root) else root.parent
        runs += [read_run(path, path.relative_to(base).as_posix()) for path in _run_dirs(root)]
    return runs


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "run_config.json").is_file() or (path / "results.json").is_file()


def _run_dirs(root: Path) -> list[Path]:
    if is_run_dir(root):
        return [root]
    found = []
    for child in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural):
        found += _run_dirs(child)
    return found


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_run(path: Path, name: str) -> Run:
    overrides = read_overrides(path)
    results = _read_json(path / "results.json")
    config = _read_yaml(path / ".hydra" / "config.yaml") or _read_json(path / "run_config.json") or {}
    seed = overrides.pop("seed", None)
    seed = int(seed) if seed is not None else config.get("seed")
    return Run(path, name, overrides, seed, "finished" if results else _unfinished_status(path), results or {})


def read_overrides(path: Path) -> dict[str, str]:
    """`.hydra/overrides.yaml` as {key: value} (see `parse_overrides`)."""
    return parse_overrides(_read_yaml(path / ".hydra" / "overrides.yaml") or [])


def _unfinished_status(path: Path) -> str:
    """'failed: <its last error line>' ('diverged: ...' when training diverged) when a log of the run says so,
    else how far it got."""
    for log in sorted(path.glob("*.log")):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or re.match(r"^\w*(Error|Exception)\b", line)]
        if errors:
            kind = "diverged" if " diverged" in errors[-1] else "failed"
            return f"{kind}: {errors[-1][:200]}"
    done = sorted(p.parent.name for p in path.glob("stage_*/stats.json"))
    return f"incomplete: {len(done)} stage(s) done" if done else "incomplete: no stage done"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
