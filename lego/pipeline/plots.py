"""PNG plots of one run's results: where tokens exit, how confident they are, PPL vs compute, training curves,
MoE expert load (its heatmap, the smoothing and the atomic writing are `lego.common.plotting`'s, shared with the
report).

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global figure registry to leak into or
close, no GUI backend (PNG output goes through Agg), and safe to call from any job of a multirun. Each file is
written atomically, so a killed run never leaves a truncated PNG behind.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from lego.common.plotting import X_LABELS, moving_average, plot_expert_load, save_png, step_losses


def plot_exit_rates(results: dict, path: Path) -> Path:
    """Bar chart of the share of test tokens that exit at each block, with each block's threshold on its bar."""
    blocks = results["blocks"]
    fig = Figure(figsize=(max(4.0, 1.4 * len(blocks) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    labels = [_block_label(k, block) for k, block in enumerate(blocks)]
    rates = [block["exit_rate"] for block in blocks]
    bars = ax.bar(labels, rates, color="tab:blue")
    notes = []
    for block, rate in zip(blocks, rates, strict=True):
        threshold = _finite(block.get("threshold"))
        threshold_note = "last block" if threshold is None else f"threshold {threshold:.3f}"
        notes.append(f"{rate:.1%}\n{threshold_note}")
    ax.bar_label(bars, notes, padding=3, fontsize=9)
    ax.set_ylim(0, min(1.0, max(rates, default=0) * 1.25 + 0.1))
    ax.set_ylabel("share of test tokens exiting here")
    ax.set_title(f"Where tokens exit{_run_note(results)}")
    return save_png(fig, path)


def plot_confidence_histograms(results: dict, path: Path) -> Path:
    """One histogram per block of the exit confidence of the test tokens reaching it, threshold as a line.

    Shows how separable easy and hard tokens are at each depth: tokens right of the line exit there.
    """
    histograms = results["confidence_histograms"]
    blocks = results.get("blocks") or [{} for _ in histograms]
    fig = Figure(figsize=(4.0 * len(histograms), 3.6), layout="constrained")
    axes = fig.subplots(1, len(histograms), squeeze=False)[0]
    for k, (ax, histogram, block) in enumerate(zip(axes, histograms, blocks, strict=True)):
        ax.stairs(histogram["counts"], histogram["edges"], fill=True, color="tab:blue", alpha=0.7)
        threshold = _finite(block.get("threshold"))
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
            ax.legend(loc="upper left", fontsize=9)
        exit_rate = block.get("exit_rate")
        exits = "" if exit_rate is None else f": {exit_rate:.1%} of tokens exit"
        ax.set_title(f"{_block_label(k, block)}{exits}".replace("\n", " "), fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("exit confidence")
        if k == 0:
            ax.set_ylabel("tokens reaching the block")
    fig.suptitle(f"Exit confidence per block on the test set{_run_note(results)}")
    return save_png(fig, path)


def plot_ppl_vs_compute(
    curves: dict[str, list[dict]], path: Path, *, x: str = "honest_cost", points: dict[str, dict] | None = None
) -> Path:
    """Test PPL against compute: each curve a threshold scan (line with markers), each point one operating point.

    Scan points are labelled with their target exit share when the rows have one, so the trade-off can be read
    off directly.
    """
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    colors = {}
    for label, rows in curves.items():
        xs = [_number(row.get(x)) for row in rows]
        ys = [_number(row.get("test_ppl")) for row in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        colors[label] = line.get_color()
        for row, px, py in zip(rows, xs, ys, strict=True):
            if row.get("target_exit_share") is not None:
                ax.annotate(
                    f"{row['target_exit_share']:.0%}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    for label, point in (points or {}).items():
        # "<curve> (calibrated)" takes its curve's colour
        curve = next((name for name in colors if label.startswith(f"{name} (")), None)
        ax.plot(
            [_number(point.get(x))],
            [_number(point.get("test_ppl"))],
            marker="*",
            markersize=16,
            linestyle="",
            label=label,
            **({"color": colors[curve], "markeredgecolor": "black"} if curve else {}),
        )
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel("test perplexity")
    labelled = any(row.get("target_exit_share") is not None for rows in curves.values() for row in rows)
    ax.set_title("Test perplexity vs compute" + (" (labels: target exit share)" if labelled else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, path)


def plot_training_curves(stage_evals: list[list[dict]], path: Path) -> Path:
    """One panel per stage: the training PPL of every step (faint) and smoothed, with the validation PPL at
    each evaluation on it, against the stage's own step count.

    Panels, not one shared axis: stage k >= 1 trains and validates on the tokens the previous block passes
    on, so its PPL sits above stage 0's without being worse. Per-step losses come from each eval row's
    `step_losses`; rows from before they were recorded fall back to the mean training PPL per evaluation.
    Log scale when a panel's PPLs span more than 10x (PPL falls by orders of magnitude early on).
    """
    stages = [(k, rows) for k, rows in enumerate(stage_evals) if rows]
    fig = Figure(figsize=(5.0 * max(1, len(stages)), 4.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(stages)), squeeze=False)[0]
    for ax, (k, rows) in zip(axes, stages, strict=False):
        color = f"C{k}"
        ppls = []
        steps, losses = step_losses(rows)
        if losses:
            train = [math.exp(min(loss, 50.0)) for loss in losses]
            smooth = [math.exp(min(loss, 50.0)) for loss in moving_average(losses, max(1, len(losses) // 25))]
            ax.plot(steps, train, color=color, alpha=0.25, linewidth=0.8, label="train, every step")
            ax.plot(steps, smooth, color=color, linewidth=2.0, label="train, smoothed")
            ppls += train
        elif any("train_ppl" in row for row in rows):
            train = [_number(row.get("train_ppl")) for row in rows]
            ax.plot([row["step"] for row in rows], train, color=color, marker="x", linestyle="--", label="train")
            ppls += train
        val = [_number(row.get("val_ppl")) for row in rows]
        ax.plot([row["step"] for row in rows], val, color="black", marker="o", markersize=5, label="validation")
        ppls += val
        finite = [ppl for ppl in ppls if ppl > 0 and math.isfinite(ppl)]
        if finite and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())  # 30, not 3 x 10^1
            ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.4)))
        tokens = "all tokens" if k == 0 else f"Block {k - 1}'s hard tokens"
        ax.set_title(f"stage {k}: {tokens}", fontsize=10)
        ax.set_xlabel("step (within the stage)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("perplexity (stage's own tokens)")
    fig.suptitle("Training curves per stage")
    return save_png(fig, path)


def make_run_plots(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write the plots a run's results support into `out_dir`; returns plot name -> PNG path.

    A plot whose data is missing or empty (e.g. no threshold scan, no eval rows) is skipped, not an error.
    """
    out_dir = Path(out_dir)
    blocks = results.get("blocks") or []
    written: dict[str, Path] = {}
    if blocks:
        written["exit_rates"] = plot_exit_rates(results, out_dir / "exit_rates.png")
    if results.get("confidence_histograms"):
        written["confidence_histograms"] = plot_confidence_histograms(results, out_dir / "confidence_histograms.png")
    if results.get("threshold_scan"):
        written["ppl_vs_compute"] = plot_ppl_vs_compute(
            {"threshold scan": results["threshold_scan"]},
            out_dir / "ppl_vs_compute.png",
            points={"this run (calibrated thresholds)": results},
        )
    stage_evals = [block.get("evals") or [] for block in blocks]
    if any(stage_evals):
        written["training_curves"] = plot_training_curves(stage_evals, out_dir / "training_curves.png")
    if results.get("moe"):
        written["expert_load"] = plot_expert_load(results["moe"], out_dir / "expert_load.png")
    return written


def _block_label(k: int, block: dict) -> str:
    layers = block.get("layers")
    if layers is None:
        return f"block {k}"
    return f"block {k}\n({layers} layer{'' if layers == 1 else 's'})"


def _run_note(results: dict) -> str:
    """'\ntest PPL 12.3, honest cost 0.71' from whichever of the two the results have: a second title line,
    so that a title fits the width of a one- or two-block figure."""
    parts = []
    if _finite(results.get("test_ppl")) is not None:
        parts.append(f"test PPL {results['test_ppl']:.2f}")
    if _finite(results.get("honest_cost")) is not None:
        parts.append(f"honest cost {results['honest_cost']:.2f}")
    return "\n" + ", ".join(parts) if parts else ""


def _number(value: float | None) -> float:
    """NaN for a missing value, which matplotlib leaves as a gap instead of failing on None."""
    return math.nan if value is None else float(value)


def _finite(value: float | None) -> float | None:
    """The value if it is a finite number, else None (no threshold: the last block, or not calibrated yet)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
