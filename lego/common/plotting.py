"""Plotting pieces that a run's plots (`lego.pipeline.plots`) and the report's (`lego.report.plots`) share: axis
labels, per-step training losses and their smoothing, the MoE expert-load heatmap, and atomic PNG writing.

Figures are `matplotlib.figure.Figure`s, not pyplot ones: no global figure registry, no GUI backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lego.atomic import atomic_write

DPI = 120
X_LABELS = {
    "honest_cost": "honest cost (forward FLOPs / dense model's, incl. K/V of kept tokens and head)",
    "compute_cost": "compute cost (layers used / total layers)",
    "shallow_ratio": "shallow ratio (share of tokens exiting before the last block)",
}


def step_losses(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(step, LM loss) of every training step recorded in the eval rows (`step_losses`, the steps since the
    previous evaluation); empty when the rows predate per-step recording."""
    steps, losses = [], []
    for row in rows:
        recorded = row.get("step_losses") or []
        steps += range(row["step"] - len(recorded) + 1, row["step"] + 1)
        losses += recorded
    return steps, losses


def moving_average(values: list[float], half_window: int) -> list[float]:
    """Mean over a window of 2 * half_window + 1 values centred on each one (shorter at the ends): smooths the
    step-to-step noise without shifting the curve to later steps as a trailing average would."""
    array = np.asarray(values, dtype=float)
    half_window = min(half_window, (len(array) - 1) // 2)  # a longer window would lengthen `same` output
    kernel = np.ones(2 * max(half_window, 0) + 1)
    return list(np.convolve(array, kernel, mode="same") / np.convolve(np.ones_like(array), kernel, mode="same"))


def plot_expert_load(layers: list[dict], path: Path, title: str = "MoE expert load on the test set") -> Path:
    """A heatmap of the share of each MoE layer's routed slots each expert computed (rows: layers, as
    `lego.moe.RoutingTally` names them; 1/experts everywhere is perfect balance), each row labelled with its
    imbalance (max/mean), router entropy and the tokens it routed: a later block's layers see only the tokens
    that reached it."""
    experts = max(len(row["load"]) for row in layers)
    grid = np.full((len(layers), experts), np.nan)
    for i, row in enumerate(layers):
        grid[i, : len(row["load"])] = row["load"]
    fig = Figure(figsize=(min(11.0, 5.5 + 0.5 * experts), 1.9 + 0.5 * len(layers)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(grid)), 1e-9))
    ax.set_xticks(range(experts), [str(e) for e in range(experts)])
    labels = [
        f"{row['layer']}: {row['tokens']:,} tokens\nmax/mean {row['imbalance']:.2f}, entropy {row['entropy']:.2f}"
        f"/{row['max_entropy']:.2f}" + (f"\n{row['dropped']:.1%} dropped" if row.get("dropped") else "")
        for row in layers
    ]
    ax.set_yticks(range(len(layers)), labels, fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(f"{title}\nshare of each layer's routed slots (balanced: {1 / experts:.3f} each)", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of slots")
    return save_png(fig, path)


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG atomically: a killed run never leaves a truncated one behind."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)
