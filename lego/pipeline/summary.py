"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from lego.pipeline.checks import worse_than_unigram


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _speedup(results: dict) -> str:
    """'1.16x (quartiles 1.15-1.18x; noise floor ±1.8 %; load 0.3 on 2 CPUs)', or the figure flagged as not
    meaningful with why; results.json files from before the noise floor give the figure and its quartiles."""
    speedup, iqr = results.get("inference_speedup"), results.get("inference_speedup_iqr")
    notes = [f"quartiles {iqr[0]:.2f}-{iqr[1]:.2f}x"] if iqr else []
    if results.get("inference_speedup_noise") is not None:
        notes.append(f"noise floor ±{results['inference_speedup_noise'] * 100:.1f} %")
    load = results.get("inference_speedup_load")
    if load:
        notes.append(f"load {max(load['start'], load['end']):.1f} on {load['cpus']} CPUs")
    figure = f"{_fmt(speedup, '.2f')}x"
    caveat = results.get("inference_speedup_caveat")
    if caveat:
        return f"{figure}, not meaningful: {caveat} ({', '.join(notes)}); rerun on a quiet machine"
    return figure + (f" ({'; '.join(notes)})" if notes else "")


def _throughput(results: dict) -> str:
    """'training throughput 52,310 tokens/s, MFU 41.2 % (of the devices' dense bf16 peak)'; MFU only where the
    device's peak is known (not on the CPU)."""
    rate, mfu = results.get("train_tokens_per_second"), results.get("train_mfu")
    shown = f"MFU {mfu:.1%} (of the devices' dense bf16 peak)" if mfu is not None else "MFU - (no known peak)"
    return f"training throughput {_fmt(rate, ',.0f')} tokens/s, {shown}"


def _ltt(results: dict) -> list[str]:
    """The Learn-then-Test exits' line (`trainer.calibration=ltt`): the promise and what the test split measured."""
    ltt = results.get("ltt")
    if not ltt:
        return []
    what = "predictions changed from full depth" if ltt["risk"] == "disagreement" else "PPL increase over full depth"
    return [
        f"Learn-then-Test exits: {what} <= {ltt['epsilon']:.1%} with probability >= {1 - ltt['delta']:.0%} promised "
        f"(exit share {ltt['exit_share']:.2f}, certified on {ltt['calibration_windows']} validation windows); "
        f"measured on test {ltt['test_risk']:.2%}, at honest cost {results['honest_cost']:.3f}"
    ]


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
        *worse_than_unigram(results),
        f"val PPL {results['val_ppl']:.2f} (acc {results['val_acc']:.3f})",
        f"shallow ratio {results['shallow_ratio']:.1%}; compute cost {results['compute_cost']:.3f} "
        f"(honest, with K/V of kept tokens and the head: {results['honest_cost']:.3f})",
        f"measured speed-up over full depth {_speedup(results)}",
        f"training compute {results['train_flops'] / 1e12:.2f} TFLOP (steps and hard-token collection) "
        f"({_fmt(results['train_flops_vs_dense'], '.2f')} x a dense pass over Block 0's tokens); "
        f"wall time {results['wall_seconds']:.0f}s",
        _throughput(results),
        *_ltt(results),
    ]
    if run_dir is not None:
        lines.append(f"outputs: {run_dir} (results.json, plots/, stage_*/, wandb/)")
    return "\n".join(lines)
