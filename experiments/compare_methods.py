"""LEGO vs dense and Universal baselines, same width, depth, corpus and token budget: one command.

Runs `train.py` once per method (sequentially, each in its own run directory; finished runs are
skipped, so an interrupted comparison resumes), then writes a markdown report and a PPL-vs-compute
plot with one curve per method (each trained model's threshold scan):

    python experiments/compare_methods.py                       # outputs/compare/, docs/results.md
    python experiments/compare_methods.py --report-only outputs/compare
    python experiments/compare_methods.py --quick --out /tmp/c --report /tmp/c/results.md   # smoke size

The goal LEGO is chasing: test PPL within 5 % of the dense baseline at <= 0.75 of its inference compute
and <= 0.8 of its training compute. The report says, per LEGO run, whether it gets there and by how much.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lego.data import prepare_data
from lego.model import LEGOTransformer
from lego.pipeline.config import RunConfig, model_config, to_run_config
from lego.pipeline.evaluation import measure_speedup
from lego.pipeline.files import load_weights
from lego.pipeline.plots import plot_ppl_vs_compute

REPO = Path(__file__).resolve().parents[1]
DENSE = "dense"
DENSE_RUNS = (DENSE, "dense, one block")  # the goal is checked against the better of the two
# name -> train.py overrides; the experiment files hold the shared settings (conf/experiment/compare_*.yaml)
METHODS: dict[str, list[str]] = {
    DENSE: ["+experiment=compare_dense"],
    "dense, one block": ["+experiment=compare_dense_block"],
    "lego r=0.3": ["+experiment=compare_lego", "hard_ratio.value=0.3"],
    "lego r=0.5": ["+experiment=compare_lego", "hard_ratio.value=0.5"],
    "lego r=0.7": ["+experiment=compare_lego", "hard_ratio.value=0.7"],
    "lego 3 blocks r=0.5": ["+experiment=compare_lego3", "hard_ratio.value=0.5"],
    # a 1-layer Block 0: the split that can fit the training-compute goal (Block 0 and the head on every
    # token cost 0.62 x dense training with 2 of 4 layers, see the report's "Why" table)
    "lego 1+3 r=0.3": [
        "+experiment=compare_lego",
        "hard_ratio.value=0.3",
        "block_schedule.blocks.0.layers=1",
        "block_schedule.blocks.1.layers=3",
    ],  # fmt: skip
    "universal lpt": ["+experiment=compare_lpt"],
    "universal asymmetric": ["+experiment=compare_asymmetric"],
    "universal lr decreasing": ["+experiment=compare_lr_decreasing"],
}
QUICK = ["model.dim=32", "model.num_heads=2", "tokenizer=bytes", "data.seq_len=32", "data.max_train_tokens=8000",
         "data.max_eval_tokens=2000", "trainer.threshold_scan=[0.0,0.5]", "wandb=disabled"]  # fmt: skip
GOAL = {"ppl_gap": 0.05, "inference": 0.75, "training": 0.8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compare", help="one run dir per method")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--report-only", type=Path, metavar="DIR", help="only write the report from DIR's runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), help="run a subset of the methods")
    parser.add_argument(
        "--remeasure-speedup", action="store_true", help="re-time each LEGO run's early exit (speedup.json)"
    )
    return parser.parse_args(argv)


def run_dir_name(name: str) -> str:
    """A folder name Hydra accepts in an override (no spaces, commas or '=')."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", name.replace("=", ""))


def run_all(out: Path, quick: bool, only: list[str] | None) -> None:
    for name, overrides in METHODS.items():
        run_dir = out / run_dir_name(name)
        if only and name not in only or (run_dir / "results.json").is_file():
            continue
        command = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
                   "trainer.progress=false", *(QUICK if quick else [])]  # fmt: skip
        print(f"== {name}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)


def load_runs(out: Path) -> dict[str, dict]:
    runs = {}
    for name in METHODS:
        path = out / run_dir_name(name) / "results.json"
        if path.is_file():
            runs[name] = json.loads(path.read_text())
            remeasured = path.with_name("speedup.json")
            if remeasured.is_file():
                runs[name]["inference_speedup"] = json.loads(remeasured.read_text())["inference_speedup"]
    if DENSE not in runs:
        raise SystemExit(f"error: no finished dense baseline in {out}; run the comparison first")
    return runs


def remeasure_speedup(run_dir: Path) -> float:
    """Rebuild a finished LEGO run's final model and time its early exit against full depth on the test
    batches, alternately (`lego.pipeline.evaluation.measure_speedup`); written to run_dir/speedup.json."""
    run = to_run_config(
        OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(run_dir / ".hydra/config.yaml"))
    )
    prepared = prepare_data(run.data, run.tokenizer, seed=run.seed, cache_dir=run.cache_dir, progress=False)
    model = LEGOTransformer.from_config(model_config(run, prepared.vocab_size))
    last_stage = max(run_dir.glob("stage_*"), key=lambda path: int(path.name.split("_")[1]))
    load_weights(model, last_stage / "model.safetensors")  # thresholds are buffers: they come back too
    speedup = measure_speedup(model, prepared.test, run.trainer.eval_batch_size, torch.device("cpu"))
    (run_dir / "speedup.json").write_text(json.dumps({"inference_speedup": speedup}) + "\n")
    return speedup


def best_under(scan: list[dict], budget: float) -> dict | None:
    """The lowest-PPL point (threshold scan or calibrated) whose honest cost fits the budget."""
    fitting = [row for row in scan if row["honest_cost"] is not None and row["honest_cost"] <= budget]
    return min(fitting, key=lambda row: row["test_ppl"]) if fitting else None


def why(runs: dict[str, dict], dense_flops: float) -> list[str]:
    """Where each LEGO run's training compute goes, and how well its exit decision works: the evidence
    for why a run misses the goal."""
    lines = [
        "",
        "## Why: where the training compute goes, and how good the exits are",
        "",
        "Training FLOPs per part, over the dense baseline's. *Block 0* trains on every token with the shared "
        "head; *collection* scores the training tokens after each stage but the last; *later blocks* train on "
        "hard tokens (their kept context tokens still cost K/V). *exit@0* is the share of test tokens leaving "
        "at Block 0 against the calibration target (1 - hard_ratio); *PPL exited / went on* compares the tokens "
        "Block 0 let go with those it passed on, scored by the block they exited at.",
        "",
        "| method | Block 0 | collection | later blocks | total | exit@0 (target) | PPL exited / went on |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in runs.items():
        if not name.startswith("lego"):
            continue
        blocks = r["blocks"]
        first, later = blocks[0]["train_flops"], sum(b["train_flops"] for b in blocks[1:])
        collect = sum(b.get("collect_flops", 0.0) for b in blocks)
        went_on = [b for b in blocks[1:] if b["exit_count"]]
        went_on_ppl = math.exp(
            sum(math.log(b["ppl"]) * b["exit_count"] for b in went_on) / sum(b["exit_count"] for b in went_on)
        )
        target = 1 - blocks[0]["hard_ratio"]
        lines.append(
            f"| {name} | {first / dense_flops:.2f} | {collect / dense_flops:.2f} | {later / dense_flops:.2f} | "
            f"{r['train_flops'] / dense_flops:.2f} | {blocks[0]['exit_rate']:.1%} ({target:.0%}) | "
            f"{blocks[0]['ppl']:.1f} / {went_on_ppl:.1f} |"
        )
    return lines


def report(runs: dict[str, dict], out: Path, report_path: Path, command: str) -> str:
    dense = min((runs[name] for name in DENSE_RUNS if name in runs), key=lambda r: r["test_ppl_full_depth"])
    dense_flops = dense["train_flops"]
    shown = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    lines = [
        "# Results: LEGO vs dense and Universal baselines",
        "",
        f"Made by `{command}` (runs in `{shown}`; `--report-only {shown}` rewrites this file from them).",
        f"Corpus: {dense['data']['source']}, {dense['data']['tokens']['train']:,} training tokens, "
        f"{dense['test_tokens']:,} test tokens, vocab {dense['data']['vocab_size']:,}; "
        f"every model {dense['parameters'] / 1e6:.2f}M parameters, 4 layers.",
        "",
        "PPL is test perplexity with each method's calibrated early exit; *full depth* is the same model with "
        "no early exit. *compute* is the original metric (layers used), *honest* counts every FLOP of "
        "inference (K/V of kept tokens, attention, head) over the dense forward. *speed-up* is measured wall "
        "time of full-depth forwards over early-exit forwards of the same model on the same test batches, "
        "timed alternately (LEGO runs; the Universal runs barely exit at their 0.95 threshold). Training compute "
        "is counted FLOPs over the dense baseline's: training steps (3x forward, K/V of context tokens "
        "included) plus, for LEGO, each stage's forward over its training data that scores the next "
        "block's hard tokens (validation passes are not counted, for any method); wall time is the sum of "
        "the stages on a 2-core CPU.",
        "",
        "| method | test PPL | full depth PPL | acc | val PPL | shallow | compute | honest | speed-up "
        "| train FLOPs vs dense | train s | PPL vs dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in runs.items():
        train_s = sum(s or 0.0 for s in r["stage_seconds"])
        speedup = r.get("inference_speedup")
        lines.append(
            f"| {name} | {r['test_ppl']:.2f} | {r['test_ppl_full_depth']:.2f} | {r['test_acc']:.3f} | "
            f"{r['val_ppl']:.2f} | {r['shallow_ratio']:.1%} | {r['compute_cost']:.3f} | {r['honest_cost']:.3f} | "
            f"{f'{speedup:.2f}x' if speedup and r['method'] == 'lego' else '-'} | "
            f"{r['train_flops'] / dense_flops:.2f} | {train_s:.0f} | "
            f"{r['test_ppl'] / dense['test_ppl'] - 1:+.1%} |"
        )
    lines += ["", "## The goal: within 5 % of dense PPL at <= 0.75 inference and <= 0.8 training compute", ""]
    reference = dense["test_ppl_full_depth"]
    lines.append(
        f"Reference: the better dense baseline ({dense['experiment_name']}), test PPL {reference:.2f}; "
        "*PPL vs dense* and training compute above are relative to it."
    )
    lines.append("")
    for name, r in runs.items():
        if not name.startswith("lego"):
            continue
        calibrated = {"test_ppl": r["test_ppl"], "honest_cost": r["honest_cost"]}
        point = best_under([*r["threshold_scan"], calibrated], GOAL["inference"])
        training = r["train_flops"] / dense_flops
        if point is None:
            lines.append(f"- **{name}**: no threshold-scan point at honest cost <= {GOAL['inference']}.")
            continue
        gap = point["test_ppl"] / reference - 1
        verdict = "meets" if gap <= GOAL["ppl_gap"] and training <= GOAL["training"] else "misses"
        lines.append(
            f"- **{name}** {verdict} the goal: best PPL at honest cost <= {GOAL['inference']} is "
            f"{point['test_ppl']:.2f} ({gap:+.1%} vs dense; honest cost {point['honest_cost']:.3f}), "
            f"training compute {training:.2f} x dense."
        )
    lines += why(runs, dense_flops)
    lines += ["", f"![PPL vs compute]({report_path.stem}_ppl_vs_compute.png)", ""]
    curves = {name: r["threshold_scan"] for name, r in runs.items()}
    points = {f"{name} (calibrated)": r for name, r in runs.items() if name.startswith("lego")}
    plot_ppl_vs_compute(curves, report_path.with_name(f"{report_path.stem}_ppl_vs_compute.png"), points=points)
    text = "\n".join(lines)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    out = args.report_only or args.out
    if not args.report_only:
        run_all(out, args.quick, args.only)
    if args.remeasure_speedup:
        for name in METHODS:
            run_dir = out / run_dir_name(name)
            if (run_dir / "results.json").is_file() and name not in DENSE_RUNS and name.startswith("lego"):
                print(f"{name}: early exit {remeasure_speedup(run_dir):.2f}x faster than full depth")
    command = "python experiments/compare_methods.py" + (" --quick" if args.quick else "")
    text = report(load_runs(out), out, args.report, command)
    print(text)
    return text


if __name__ == "__main__":
    main()
