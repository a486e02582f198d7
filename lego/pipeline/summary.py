"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _spread(iqr: list[float] | None) -> str:
    """' (quartiles 1.10-1.25x)' for a timed ratio's spread over its rounds."""
    return "" if not iqr else f" (quartiles {iqr[0]:.2f}-{iqr[1]:.2f}x)"


def format_results(results: dict, run_dir: Path | None = None) -> str:
    rows = [
        f"{'block':>5} {'layers':>6} {'threshold':>9} {'reached':>9} {'exits':>9} {'rate':>6} "
        f"{'conf':>5} {'PPL':>8} {'acc':>6} {'train s':>8}"
    ]
    for b in results["blocks"]:
        rows.append(
            f"{b['block']:>5} {b['layers']:>6} {_fmt(b['threshold'], '.3f'):>9} {b['reached']:>9,} "
            f"{b['exit_count']:>9,} {b['exit_rate']:>6.1%} {_fmt(b['mean_confidence'], '.2f'):>5} "
            f"{_fmt(b['ppl'], '.2f'):>8} {_fmt(b['acc'], '.3f'):>6} {_fmt(b['seconds'], '.0f'):>8}"
        )
    lines = [
        "",
        f"== {results['experiment_name']} ({results['method']}) ==",
        *rows,
        "",
        f"test PPL {results['test_ppl']:.2f} (acc {results['test_acc']:.3f}) with early exit; "
        f"{results['test_ppl_full_depth']:.2f} at full depth; unigram baseline {results['unigram_ppl']:.1f}",
        f"val PPL {results['val_ppl']:.2f} (acc {results['val_acc']:.3f})",
        f"shallow ratio {results['shallow_ratio']:.1%}; compute cost {results['compute_cost']:.3f} "
        f"(honest, with K/V of kept tokens and the head: {results['honest_cost']:.3f}); measured speed-up over "
        f"full depth {_fmt(results.get('inference_speedup'), '.2f')}x{_spread(results.get('inference_speedup_iqr'))}",
        f"training compute {results['train_flops'] / 1e12:.2f} TFLOP (steps and hard-token collection) "
        f"({_fmt(results['train_flops_vs_dense'], '.2f')} x a dense pass over Block 0's tokens); "
        f"wall time {results['wall_seconds']:.0f}s",
    ]
    if run_dir is not None:
        lines.append(f"outputs: {run_dir} (results.json, plots/, stage_*/, wandb/)")
    return "\n".join(lines)
