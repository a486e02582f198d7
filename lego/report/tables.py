"""The two CSVs of a report: one row per run (`summary.csv`) and one row per config, its seeds pooled
(`summary_by_config.csv`: mean, sample standard deviation and n of every metric)."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from lego.atomic import atomic_write
from lego.report.collect import Run


@dataclass
class ConfigGroup:
    """The finished and unfinished runs of one config (all overrides but the seed equal)."""

    key: tuple[tuple[str, str], ...]
    runs: list[Run]

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.finished]

    def stat(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample sd, n) of a metric over the finished runs that have it; sd None below two runs."""
        return mean_sd_n([run.metrics().get(metric) for run in self.finished])


def mean_sd_n(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd, n) of the finite values; sd None below two values, mean None with none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, 0
    sd = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), sd, len(values)


def override_columns(runs: list[Run]) -> list[str]:
    """Every override key of any run, in first-seen order."""
    return list(dict.fromkeys(key for run in runs for key in run.overrides))


def varying_keys(runs: list[Run]) -> list[str]:
    """The config keys that tell the configs apart (the seed aside), in first-seen order, leaving out a key that
    separates no configs the keys before it did not already separate (e.g. a second block's epochs that only
    the LEGO configs set, when their experiment name already differs)."""
    keys = list(dict.fromkeys(key for run in runs for key, _ in run.config_key()))
    configs = list({run.config_key(): dict(run.config_key()) for run in runs}.values())
    chosen: list[str] = []
    for key in keys:
        before = len({tuple(config.get(k) for k in chosen) for config in configs})
        if len({tuple(config.get(k) for k in [*chosen, key]) for config in configs}) > before:
            chosen.append(key)
    return chosen


def metric_columns(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(metric for run in runs for metric in run.metrics()))


def group_runs(runs: list[Run]) -> list[ConfigGroup]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config_key(), []).append(run)
    return [ConfigGroup(key, members) for key, members in groups.items()]


def config_label(group: ConfigGroup, keys: list[str]) -> str:
    """'small hard_ratio=0.3 model.dim=64' from the swept keys (the experiment by its name alone, schedule keys
    without their 'block_schedule.' prefix); the run folder for a one-config report."""
    values = dict(group.key)
    parts = [values[key] if key == "experiment" else f"{_short(key)}={values[key]}" for key in keys if key in values]
    return " ".join(parts) or values.get("experiment") or group.runs[0].name


def _short(key: str) -> str:
    return key.removeprefix("block_schedule.").removesuffix(".value")


def summary_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    columns = ["run", "status", *override_columns(runs), "seed", *metric_columns(runs)]
    rows = []
    for run in runs:
        rows.append({"run": run.name, "status": run.status, **run.overrides, "seed": run.seed, **run.metrics()})
    return columns, rows


def grouped_rows(groups: list[ConfigGroup], runs: list[Run]) -> tuple[list[str], list[dict]]:
    keys = list(dict.fromkeys(key for group in groups for key, _ in group.key))
    metrics = metric_columns(runs)
    columns = [*keys, "runs", "finished"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_sd", f"{metric}_n"]
    rows = []
    for group in groups:
        row: dict = {**dict(group.key), "runs": len(group.runs), "finished": len(group.finished)}
        for metric in metrics:
            row[f"{metric}_mean"], row[f"{metric}_sd"], row[f"{metric}_n"] = group.stat(metric)
        rows.append(row)
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """Missing values are empty cells; floats keep full precision."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: _cell(row.get(key)) for key in columns} for row in rows)

    atomic_write(path, write)
    return path


def _cell(value) -> object:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def mean_sd(mean: float | None, sd: float | None, spec: str = ".2f") -> str:
    """'12.34 ± 0.56' for a table cell ('-' when there is no value, no '±' from a single run)."""
    if mean is None:
        return "-"
    return f"{mean:{spec}}" + ("" if sd is None else f" ± {sd:{spec}}")
