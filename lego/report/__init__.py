"""The report of a sweep (or of any set of runs): `python -m lego.report PATH... [--out DIR]`.

Writes into the sweep folder (or `--out`):
  summary.csv             one row per run: its overrides (one column per key), seed, status, headline results
  summary_by_config.csv   one row per config (every override but the seed): mean, sd and n of each metric
  report.html             one self-contained page (plots embedded): the grouped table, PPL vs inference cost and
                          vs training FLOPs with error bars, exit rates, confidence histograms, training curves
  report_plots/*.png      the same plots as files

`train.py` writes it at the end of every multirun (`lego.report.callback.SweepReport`) and for every single
run. It reads only run folders (results.json, .hydra/), so it can be re-made at any time, for any mix of runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from lego.atomic import atomic_write
from lego.errors import DataError
from lego.report import html, plots
from lego.report.collect import Run, find_runs
from lego.report.tables import (
    config_label,
    group_runs,
    grouped_rows,
    mean_sd,
    summary_rows,
    varying_keys,
    write_csv,
)

__all__ = ["ReportFiles", "write_report"]


@dataclass
class ReportFiles:
    summary: Path
    by_config: Path
    html: Path
    runs: int
    finished: int


def write_report(paths: list[Path], out: Path | None = None, title: str | None = None) -> ReportFiles:
    """Collect the runs at or under `paths` and write the CSVs, plots and page into `out` (default: the one
    path given)."""
    paths = [Path(p) for p in paths]
    if out is None:
        if len(paths) != 1:
            raise DataError("several folders given: name the report's folder with --out DIR")
        out = paths[0]
    try:
        runs = find_runs(paths)
    except FileNotFoundError as err:
        raise DataError(str(err)) from err
    if not runs:
        raise DataError(f"no run folders (with .hydra/ or results.json) under {', '.join(map(str, paths))}")
    out = Path(out)
    groups = group_runs(runs)
    keys = varying_keys(runs)
    labels = [config_label(group, keys) for group in groups]
    summary = write_csv(out / "summary.csv", *summary_rows(runs))
    by_config = write_csv(out / "summary_by_config.csv", *grouped_rows(groups, runs))

    finished = [run for run in runs if run.finished]
    sections = [("Configs: mean ± sd over seeds", _config_table(groups, labels))]
    if finished:
        sections += _figures(groups, labels, out / "report_plots")
    sections.append(("Every run", _run_table(runs)))
    swept = ", ".join(keys) if keys else "nothing (one config)"
    intro = (
        f"{len(runs)} runs ({len(finished)} finished) in {len(groups)} configs; swept: {escape(swept)}. "
        "Test PPL uses each run's calibrated early exit; honest cost counts every inference FLOP over the dense "
        "model's."
    )
    page = html.page(title or f"LEGO report: {out.resolve().name}", intro, sections)
    html_path = out / "report.html"
    atomic_write(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return ReportFiles(summary, by_config, html_path, len(runs), len(finished))


def _config_table(groups, labels: list[str]) -> str:
    n_blocks = max((len(run.results.get("exit_rates") or []) for g in groups for run in g.finished), default=0)
    columns = ["config", "finished", "test PPL", "full depth PPL", "val PPL", "honest cost", "shallow",
               "train FLOPs vs dense", "speed-up", *(f"exit @{k}" for k in range(n_blocks)), "wall s"]  # fmt: skip
    moe = any(run.results.get("moe") for group in groups for run in group.finished)
    if moe:
        columns.insert(-1, "MoE max/mean load")
    ltt = any(group.stat("ltt_test_risk")[2] for group in groups)  # trainer.calibration=ltt
    if ltt:
        columns.insert(-1, "LTT risk: promised / test")
    mfu = any(group.stat("train_mfu")[2] for group in groups)  # only where a device's peak is known (not the CPU)
    columns[-1:-1] = ["train tok/s", *(["MFU"] if mfu else [])]
    rows, bad = [], set()
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        if len(group.finished) < len(group.runs):
            bad.add(i)
        rows.append([
            label,
            f"{len(group.finished)}/{len(group.runs)}",
            mean_sd(*group.stat("test_ppl")[:2]),
            mean_sd(*group.stat("test_ppl_full_depth")[:2]),
            mean_sd(*group.stat("val_ppl")[:2]),
            mean_sd(*group.stat("honest_cost")[:2], ".3f"),
            mean_sd(*group.stat("shallow_ratio")[:2], ".1%"),
            mean_sd(*group.stat("train_flops_vs_dense")[:2]),
            mean_sd(*group.stat("inference_speedup")[:2]),
            *(mean_sd(*group.stat(f"exit_rate_block_{k}")[:2], ".1%") for k in range(n_blocks)),
            *([mean_sd(*group.stat("moe_imbalance_max")[:2])] if moe else []),
            *([_ltt_risk(group)] if ltt else []),
            mean_sd(*group.stat("train_tokens_per_second")[:2], ",.0f"),
            *([mean_sd(*group.stat("train_mfu")[:2], ".1%")] if mfu else []),
            mean_sd(*group.stat("wall_seconds")[:2], ".0f"),
        ])  # fmt: skip
    return html.table(columns, rows, bad_rows=bad)


def _ltt_risk(group) -> str:
    """'<= 0.05 at 90 % / 0.031 ± 0.004': Learn-then-Test's promise (epsilon, 1 - delta) and the test risk."""
    (epsilon, _, n), (delta, _, _) = group.stat("ltt_epsilon"), group.stat("ltt_delta")
    if not n:
        return "-"
    return f"<= {epsilon:g} at {1 - delta:.0%} / {mean_sd(*group.stat('ltt_test_risk')[:2], '.3f')}"


def _run_table(runs: list[Run]) -> str:
    columns = ["run", "status", "seed", "test PPL", "full depth PPL", "val PPL", "honest cost", "speed-up", "wall s"]
    rows, bad = [], set()
    for i, run in enumerate(runs):
        m = run.metrics()
        if not run.finished:
            bad.add(i)
        rows.append([
            run.name, run.status, "-" if run.seed is None else run.seed, mean_sd(m["test_ppl"], None),
            mean_sd(m["test_ppl_full_depth"], None), mean_sd(m["val_ppl"], None),
            mean_sd(m["honest_cost"], None, ".3f"), mean_sd(m["inference_speedup"], None) + _caveat(run),
            mean_sd(m["wall_seconds"], None, ".0f"),
        ])  # fmt: skip
    return (
        "<details open><summary>one row per run (summary.csv has every column)</summary>"
        + html.table(columns, rows, text_columns=2, bad_rows=bad)
        + "</details>"
    )


def _caveat(run: Run) -> str:
    """' (not meaningful: machine busy)' after a speed-up its run judged noise (`speedup_caveat`); older runs have
    no verdict."""
    caveat = run.results.get("inference_speedup_caveat")
    return f" (not meaningful: {caveat})" if caveat else ""


def _figures(groups, labels: list[str], folder: Path) -> list[tuple[str, str]]:
    compared = sum(1 for group in groups if group.stat("train_flops")[2]) > 1
    made = [
        ("Test PPL vs inference cost", plots.plot_ppl_vs_cost, "ppl_vs_cost",
         "Each config's mean operating point (calibrated thresholds) with sd error bars over seeds; the faint lines "
         "are each run's threshold scan (PPL at other exit shares)."),
        *([("Test PPL vs training compute", plots.plot_ppl_vs_train_flops, "ppl_vs_train_flops",
            "Training FLOPs count the training steps and each stage's hard-token collection; error bars are sd "
            "over seeds.")] if compared else []),
        ("Exit rate per block", plots.plot_exit_rates, "exit_rates",
         "Share of test tokens leaving at each block (the last block takes every token still there)."),
        ("Exit confidence per block", plots.plot_confidence, "confidence",
         "Density of the exit confidence of the test tokens reaching each block, seeds pooled; dashed: threshold."),
        ("Training curves", plots.plot_training_curves, "training_curves",
         "Training and validation PPL of every run per stage; a later stage is scored on its own (hard) tokens "
         "only. A curve several configs share exactly is drawn once: the panel counts them, the legend names "
         "whose colour draws them."),
    ]  # fmt: skip
    if any(run.results.get("moe") for group in groups for run in group.finished):
        made.append(("MoE expert load", plots.plot_expert_load, "expert_load",
                     "Share of each MoE layer's routed test slots per expert, mean over seeds (label: tokens routed, "
                     "load imbalance max/mean, router entropy of its maximum); later blocks route only the tokens "
                     "reaching them."))  # fmt: skip
    sections = [(head, html.figure(draw(groups, labels, folder / f"{name}.png"), head, caption))
                for head, draw, name, caption in made]  # fmt: skip
    if not compared:
        (folder / "ppl_vs_train_flops.png").unlink(missing_ok=True)  # left by an earlier report of more configs
        sections.insert(1, ("Training compute", _compute_note(groups)))
    return sections


def _compute_note(groups) -> str:
    """With one config there is nothing to plot training compute against (a lone dot): its numbers instead."""
    (flops, sd, n), (ppl, ppl_sd, _) = groups[0].stat("train_flops"), groups[0].stat("test_ppl")
    if not n:
        return "<p>No run recorded its training FLOPs.</p>"
    vs_dense = mean_sd(*groups[0].stat("train_flops_vs_dense")[:2])
    return (
        f"<p>One config, so no plot of test PPL against training compute: training took "
        f"{mean_sd(flops / 1e12, None if sd is None else sd / 1e12)} TFLOP (steps and hard-token collection; "
        f"{vs_dense} × a dense pass over Block 0's tokens) for test PPL {mean_sd(ppl, ppl_sd)}. A report over "
        "several configs plots them against each other here.</p>"
    )
