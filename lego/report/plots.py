"""The sweep report's figures: every config in one picture, seeds as error bars or faint lines.

Each function returns the PNG's bytes (the HTML page embeds them) after writing them to `path` atomically.
Configs keep one colour across all figures; legends sit outside the axes in the constrained layout, so long
override labels are never clipped.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lego.atomic import atomic_write
from lego.common.plotting import X_LABELS, moving_average, step_losses
from lego.common.plotting import plot_expert_load as plot_layer_loads
from lego.report.tables import ConfigGroup

DPI = 110
LEGEND_WIDTH = 38  # characters per legend line
LEGEND_LINE_INCHES = 8 / 72 * 1.25  # a legend line at 8 pt
PPL_LABEL = "test perplexity (calibrated early exit)"


def color(i: int) -> str:
    return f"C{i % 10}"


def plot_ppl_vs_cost(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    """Test PPL against honest inference cost: each config's mean operating point with sd error bars,
    each run's threshold scan as a faint line behind it."""
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        for run in group.finished:
            scan = sorted(run.results.get("threshold_scan") or [], key=lambda row: row.get("honest_cost") or 0)
            xs = [_nan(row.get("honest_cost")) for row in scan]
            ys = [_nan(row.get("test_ppl")) for row in scan]
            ax.plot(xs, ys, color=color(i), alpha=0.25, linewidth=1)
        _errorbar(ax, group, "honest_cost", "test_ppl", color(i), label)
    return _finish(fig, ax, path, X_LABELS["honest_cost"], PPL_LABEL,
                   "Test PPL vs inference cost (faint: each run's threshold scan)", alpha=0.3)  # fmt: skip


def plot_ppl_vs_train_flops(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    """Test PPL against training FLOPs (steps plus hard-token collection), one point per config."""
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    flops = []
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        _errorbar(ax, group, "train_flops", "test_ppl", color(i), label)
        flops += [run.metrics()["train_flops"] for run in group.finished]
    flops = [f for f in flops if f]
    if flops and max(flops) > 8 * min(flops):
        ax.set_xscale("log")
    return _finish(fig, ax, path, "training FLOPs (training steps + hard-token collection)", PPL_LABEL,
                   "Test PPL vs training compute (error bars: sd over seeds)", alpha=0.3, which="both")  # fmt: skip


def plot_exit_rates(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    """Share of test tokens exiting at each block, one bar per config (sd over seeds as error bars)."""
    n_blocks = max((len(run.results.get("exit_rates") or []) for g in groups for run in g.finished), default=0)
    width_inches = min(11.0, max(6.0, 1.2 * n_blocks * max(1, len(groups)) ** 0.5 + 5))
    fig = Figure(figsize=(width_inches, 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(groups))
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        stats = [group.stat(f"exit_rate_block_{k}") for k in range(n_blocks)]
        xs = [k - 0.4 + width * (i + 0.5) for k in range(n_blocks)]
        heights = [_nan(mean) for mean, _, _ in stats]
        errors = [0.0 if sd is None else sd for _, sd, _ in stats]
        ax.bar(xs, heights, width=width, yerr=errors, capsize=3, color=color(i), label=label)
    ax.set_xticks(range(n_blocks), [f"block {k}" for k in range(n_blocks)])
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, None, "share of test tokens exiting here",
                   "Where tokens exit, per config (error bars: sd over seeds)", alpha=0.3, axis="y")  # fmt: skip


def plot_confidence(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    """Per block, the exit-confidence distribution of the test tokens reaching it (density, seeds pooled),
    one line per config, with each config's mean threshold dashed."""
    n_blocks = max((len(run.results.get("confidence_histograms") or []) for g in groups for run in g.finished),
                   default=0)  # fmt: skip
    fig, axes = _panels(n_blocks)
    for k, ax in enumerate(axes):
        for i, group in enumerate(groups):
            hists = [run.results["confidence_histograms"][k] for run in group.finished
                     if len(run.results.get("confidence_histograms") or []) > k]  # fmt: skip
            if not hists:
                continue
            counts = [sum(values) for values in zip(*(h["counts"] for h in hists), strict=True)]
            edges = hists[0]["edges"]
            total = sum(counts) * (edges[1] - edges[0]) or 1.0
            ax.stairs([c / total for c in counts], edges, color=color(i), linewidth=1.5)
            thresholds = [_nan((run.results.get("thresholds") or [None] * (k + 1))[k]) for run in group.finished]
            finite = [t for t in thresholds if math.isfinite(t)]
            if finite:
                ax.axvline(sum(finite) / len(finite), color=color(i), linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"block {k}", fontsize=10)
        ax.set_xlabel("exit confidence")
        ax.set_ylabel("density of tokens reaching it")
    fig.suptitle("Exit confidence on the test set (dashed: mean threshold)")
    _config_legend(fig, axes[0], labels)
    return _save(fig, path)


def plot_training_curves(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    return _save(training_curves_figure(groups, labels), path)


def training_curves_figure(groups: list[ConfigGroup], labels: list[str]) -> Figure:
    """Per stage, every run's smoothed per-step training PPL (line) and its validation PPL (dots), coloured
    by config.

    Each stage is scored on its own tokens (Block k > 0 on the hard tokens only), so panels are not comparable
    with each other; log scale when a panel spans more than 10x. A curve that several configs share exactly
    (stage 0 of configs differing only in the hard ratio, same seed) is drawn once, in the first one's colour:
    the panel says how many, and the legend names the configs drawn in another's colour."""
    n_stages = max((len(run.results.get("blocks") or []) for g in groups for run in g.finished), default=0)
    fig, axes = _panels(n_stages)
    behind: dict[int, dict[int, set[int]]] = {}  # config -> stage -> the configs whose colour its curves wear
    for k, ax in enumerate(axes):
        values = []
        curves = _stage_curves(groups, k)
        for rows, configs in curves.values():
            values += _draw_curve(ax, rows, color(configs[0]))
            for i in configs[1:]:
                behind.setdefault(i, {}).setdefault(k, set()).add(configs[0])
        if values and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set_title(f"stage {k}" + (f" (Block {k - 1}'s hard tokens)" if k else " (all tokens)"), fontsize=10)
        ax.set_xlabel("step within the stage")
        ax.set_ylabel("PPL: train (line), validation (dots)")
        ax.grid(alpha=0.3, which="both")
        _shared_note(ax, [configs for _, configs in curves.values()])
    fig.suptitle("Training curves of every run, per stage")
    _config_legend(fig, axes[0], [label + _behind_note(behind.get(i, {}), labels, i) for i, label in enumerate(labels)])
    return fig


def _stage_curves(groups: list[ConfigGroup], k: int) -> dict[tuple, tuple[list[dict], list[int]]]:
    """Stage k's distinct curves: what a run logged for it (every step's loss and validation) -> (its eval rows,
    the configs that logged exactly it, in order). Runs that logged nothing for the stage are left out."""
    curves: dict[tuple, tuple[list[dict], list[int]]] = {}
    for i, group in enumerate(groups):
        for run in group.finished:
            blocks = run.results.get("blocks") or []
            rows = (blocks[k].get("evals") or []) if len(blocks) > k else []
            if not rows:
                continue
            key = tuple((row["step"], tuple(row.get("step_losses") or ()), row.get("val_ppl")) for row in rows)
            _, configs = curves.setdefault(key, (rows, []))
            if i not in configs:
                configs.append(i)
    return curves


def _draw_curve(ax, rows: list[dict], colour: str) -> list[float]:
    """One run's smoothed training PPL and validation dots; returns the PPLs drawn (for the log-scale choice)."""
    steps, losses = step_losses(rows)
    drawn = []
    if losses:
        drawn = [math.exp(min(v, 50.0)) for v in moving_average(losses, max(1, len(losses) // 25))]
        ax.plot(steps, drawn, color=colour, alpha=0.7, linewidth=1.2)
    val = [_nan(row.get("val_ppl")) for row in rows]
    ax.plot([row["step"] for row in rows], val, color=colour, marker="o", markersize=4, linestyle="")
    return drawn + [p for p in val if math.isfinite(p) and p > 0]


def _shared_note(ax, config_sets: list[list[int]]) -> None:
    """'identical in 2 configs: 3 curves drawn once' in the panel's corner, for each number of configs sharing."""
    shared = Counter(len(configs) for configs in config_sets if len(configs) > 1)
    if shared:
        lines = [f"identical in {n} configs: {count} curve{'s' * (count > 1)} drawn once"
                 for n, count in sorted(shared.items())]  # fmt: skip
        ax.text(0.98, 0.97, "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "#bbb", "alpha": 0.9})  # fmt: skip


def _behind_note(stages: dict[int, set[int]], labels: list[str], i: int) -> str:
    """' (stage 0 drawn as hard_ratio=0.3)' for a config whose curves other configs' colours draw, naming each
    of them by what its label has and this one lacks."""
    notes = [f"stage {k} drawn as {', '.join(_difference(labels[j], labels[i]) for j in sorted(owners))}"
             for k, owners in sorted(stages.items())]  # fmt: skip
    return "".join(f" ({note})" for note in notes)


def _difference(label: str, other: str) -> str:
    """The parts of `label` that `other` lacks ('hard_ratio=0.3' of 'small hard_ratio=0.3' against
    'small hard_ratio=0.5'); the whole label when they share nothing."""
    theirs = set(other.split())
    return " ".join(part for part in label.split() if part not in theirs) or label


def _panels(n: int, columns: int = 3) -> tuple[Figure, list]:
    """A figure with n panels on a grid of at most `columns` columns (stays laptop-wide for deep models)."""
    n = max(1, n)
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols + 3.2, 3.6 * rows + 0.6), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _config_legend(fig: Figure, ax, labels: list[str]) -> None:
    """One legend for all panels."""
    _outside_legend(fig, [ax.plot([], [], color=color(i))[0] for i in range(len(labels))], labels)


def _outside_legend(fig: Figure, handles: list, labels: list[str]) -> None:
    """The legend right of the axes, its labels wrapped, the figure made tall enough to show every entry."""
    wrapped = _wrapped(labels)
    fig.legend(handles, wrapped, loc="outside right upper", fontsize=8)
    lines = sum(label.count("\n") + 1 for label in wrapped)
    fig.set_figheight(max(fig.get_figheight(), LEGEND_LINE_INCHES * (lines + 0.5 * len(labels)) + 0.6))


def plot_series(
    series: dict[str, list[dict]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    log_y: bool = False,
    band: bool = False,
) -> bytes:
    """One line per series through points {x, y, xerr, yerr, label}, error bars on both axes, each point
    annotated with its label (e.g. a token budget). `band`: a series along several x values shows its y spread as a
    shaded band along the line instead of y error bars (a scan's seed band)."""
    fig = Figure(figsize=(9.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        xs, ys = [p["x"] for p in points], [p["y"] for p in points]
        yerr = [_zero(p.get("yerr")) for p in points]
        shaded = band and len(set(xs)) > 1  # a line to shade along, not points stacked at one x
        if shaded:
            low, high = [y - e for y, e in zip(ys, yerr, strict=True)], [y + e for y, e in zip(ys, yerr, strict=True)]
            ax.fill_between(xs, low, high, color=color(i), alpha=0.2, linewidth=0)
        ax.errorbar(xs, ys, xerr=[_zero(p.get("xerr")) for p in points], yerr=None if shaded else yerr, color=color(i),
                    marker="o", markersize=4 if shaded else 6, capsize=0 if shaded else 3, label=name)  # fmt: skip
        for point in points:
            ax.annotate(point.get("label", ""), (point["x"], point["y"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8, color=color(i))  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 200, not 2 x 10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    return _finish(fig, ax, path, xlabel, ylabel, title, alpha=0.3, which="both")


def _errorbar(ax, group: ConfigGroup, x: str, y: str, colour: str, label: str) -> None:
    (mx, sx, nx), (my, sy, ny) = group.stat(x), group.stat(y)
    if not nx or not ny:
        return
    ax.errorbar([mx], [my], xerr=[_zero(sx)], yerr=[_zero(sy)], color=colour, marker="o", markersize=7, capsize=4,
                linestyle="", label=f"{label} (n={min(nx, ny)})")  # fmt: skip


def _finish(fig: Figure, ax, path: Path, xlabel: str | None, ylabel: str, title: str, **grid) -> bytes:
    """Label the axes, grid, legend outside the axes, save."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(**grid)
    _legend(fig, ax)
    return _save(fig, path)


def _legend(fig: Figure, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        _outside_legend(fig, handles, labels)


def _wrapped(labels: list[str]) -> list[str]:
    """Long config labels on several short lines, so the legend never squeezes the axes away."""
    return [textwrap.fill(label, LEGEND_WIDTH, break_on_hyphens=False) for label in labels]


def _save(fig: Figure, path: Path) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return data


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _zero(value: float | None) -> float:
    return 0.0 if value is None or not math.isfinite(value) else float(value)


def plot_expert_load(groups: list[ConfigGroup], labels: list[str], path: Path) -> bytes:
    """Each MoE config's expert load on the test set, one heatmap row per (config, layer): the share of the
    layer's routed slots each expert computed, averaged over the config's seeds."""
    rows = []
    for group, label in zip(groups, labels, strict=True):
        layers: dict[str, list[dict]] = {}
        for run in group.finished:
            for row in run.results.get("moe") or []:
                layers.setdefault(row["layer"], []).append(row)
        for layer, seen in layers.items():
            mean = [sum(values) / len(seen) for values in zip(*(row["load"] for row in seen), strict=False)]
            rows.append({
                "layer": f"{textwrap.shorten(label, LEGEND_WIDTH, placeholder='...')} {layer}",
                "load": mean, "max_entropy": seen[0]["max_entropy"],
                **{key: sum(row[key] for row in seen) / len(seen) for key in ("imbalance", "entropy", "dropped")},
                "tokens": round(sum(row["tokens"] for row in seen) / len(seen)),
            })  # fmt: skip
    plot_layer_loads(rows, path, title="MoE expert load on the test set (mean over seeds)")
    return Path(path).read_bytes()
