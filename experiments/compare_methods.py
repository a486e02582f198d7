"""LEGO vs dense and its peers: several seeds at several token budgets, same width, depth, corpus and evaluation.

One command runs the whole study (sequentially or `--jobs N` at a time, each run in its own directory;
finished runs are skipped, so a killed study re-run resumes where it stopped), then writes the sweep
report (`python -m lego.report`: summary.csv, summary_by_config.csv, report.html) into the study folder
and a markdown verdict with an isoFLOP plot into docs/:

    python experiments/compare_methods.py                        # outputs/compare/, docs/results.md
    python experiments/compare_methods.py --report-only          # rewrite the report from finished runs
    python experiments/compare_methods.py --quick --out /tmp/c --report /tmp/c/results.md   # smoke size
    python experiments/compare_methods.py --peers      # LEGO against MoD and LayerSkip: outputs/peers, docs/peers.md

`--peers` (issue 21) runs dense, LEGO 2+2 at r=0.3 and r=0.5, Mixture-of-Depths and the LayerSkip-style model at 800k
and 3.2M training tokens (four passes over 800k: the embedded corpus runs out), 3 seeds each, and dense alone at 1.6M
and 2.4M too (points on its FLOPs-vs-PPL curve), each method at its own learning rate: `--tune-lr` (which `--peers`
implies) first sweeps every method over LR_GRID (an 8x span) at 800k and takes the rate with the lowest *validation*
objective. Its report adds the sweep's table, how MoD was scored and, per budget, the quality / inference-cost
frontier: each method's threshold scan as a curve with a seed band.

Every run of a method differs only in `seed` (model initialisation and data order; the train/val/test
split has its own fixed `data.split_seed`), so the spread over seeds is the noise floor of a comparison.
Budgets are training tokens: one pass over the first N training tokens, or several passes over 800k of them
where the corpus (about 964k training tokens) runs out. Each verdict compares LEGO with dense at equal
training FLOPs (dense's PPL interpolated on its own FLOPs-vs-PPL curve) and at equal inference cost.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from lego.atomic import atomic_write
from lego.pipeline.files import read_json
from lego.report.tables import mean_sd_n

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    overrides: tuple[str, ...]
    blocks: int  # schedule entries whose epochs a budget sets
    budgets: tuple[str, ...] | None = None  # None: every budget of the study


DENSE = "dense"
LEGO_ONE_THREE = ("+experiment=compare_lego", "block_schedule.blocks.0.layers=1", "block_schedule.blocks.1.layers=3")
METHODS: dict[str, Method] = {
    # the like-for-like baseline: one 4-layer block through LEGO's own training code
    DENSE: Method(("+experiment=compare_dense_block",), 1),
    "lego r=0.3": Method(("+experiment=compare_lego", "hard_ratio.value=0.3"), 2),
    "lego r=0.5": Method(("+experiment=compare_lego", "hard_ratio.value=0.5"), 2),
    # a 1-layer Block 0: the split that can fit the training-compute goal
    "lego 1+3 r=0.3": Method((*LEGO_ONE_THREE, "hard_ratio.value=0.3"), 2),
    # the same dense architecture through the Universal framework's joint trainer (Standard preset): only at
    # the compare budget, to measure the gap between the two dense code paths against the seed noise
    "dense (Universal Standard)": Method(("+experiment=compare_dense",), 4, budgets=("400k",)),
    # Mixture of Experts in every layer (8 experts, top-2, aux loss: the same active FLOPs, 4x the FFN parameters)
    # against the same model with dense FFNs, at the compare budget
    "dense MoE": Method(("+experiment=compare_dense_block", "moe=e8_top2_aux"), 1, budgets=("400k",)),
    "lego r=0.3 MoE": Method(("+experiment=compare_lego", "hard_ratio.value=0.3", "moe=e8_top2_aux"), 2,
                             budgets=("400k",)),  # fmt: skip
    # experts only where the hard tokens go: Block 1's layers (`model.moe.layers=later_blocks`)
    "lego r=0.3 MoE in Block 1": Method(
        ("+experiment=compare_lego", "hard_ratio.value=0.3", "moe=e8_top2_aux", "model.moe.layers=later_blocks"), 2,
        budgets=("400k",),
    ),  # fmt: skip
}
# the peers (issue 21), the same width, depth, data and evaluation: Mixture-of-Depths (every other layer routed at
# 12.5 % capacity) and LayerSkip-style joint training (layer dropout, rotational exit-loss curriculum, early exit)
PEERS = {"MoD": Method(("+experiment=compare_mod",), 1), "LayerSkip": Method(("+experiment=compare_layerskip",), 1)}
METHODS.update(PEERS)
PEER_STUDY = (DENSE, "lego r=0.3", "lego r=0.5", *PEERS)  # `--peers`: these methods ...
PEER_BUDGETS = ("800k", "3.2M")  # ... at these budgets, each at its own tuned learning rate
# dense alone also runs here: points on its curve between the peer budgets, so that a method's equal-training-FLOPs
# verdict interpolates over at most 2x in FLOPs, not over the 4x between 800k and 3.2M
PEER_DENSE_BUDGETS = ("1.6M", "2.4M")
# the learning-rate sweep (`--tune-lr`): each method at these rates (an 8x span), seed 0, at TUNE_BUDGET; the rate
# with the lowest validation objective (results.json `objective`, never a test number) is the method's
LR_GRID = (5e-4, 1e-3, 2e-3, 4e-3)
PRESET_LR = 1e-3  # every compare preset's learning rate (conf/experiment/compare_*.yaml)
TUNE_BUDGET = "400k"
PEER_TUNE_BUDGET = "800k"  # the peer study tunes at its smaller budget: rates tuned at 200k did worse at 800k
# each MoE method and its dense-FFN twin
MOE_PAIRS = {"dense MoE": DENSE, "lego r=0.3 MoE": "lego r=0.3", "lego r=0.3 MoE in Block 1": "lego r=0.3"}
# budget name -> (max_train_tokens, epochs); 400k is the compare presets' own budget (conf/experiment/compare_*)
BUDGETS: dict[str, tuple[int, int]] = {
    "100k": (100_000, 1),
    "200k": (200_000, 1),
    "400k": (400_000, 1),
    "800k": (800_000, 1),
    "1.6M": (800_000, 2),
    "2.4M": (800_000, 3),
    "3.2M": (800_000, 4),
}
# run in this order: the noise floor first, then the 8x span; the others (1.6M-3.2M: 2-4 passes over 800k) on request
DEFAULT_BUDGETS = ("400k", "100k", "800k")
# Every budget keeps the compare presets' schedule shape: 50 warmup steps at 400k tokens, scaled with the budget
# (100k tokens are 49 steps: a fixed 50-step warmup would never reach the peak learning rate).
REFERENCE_TOKENS, REFERENCE_WARMUP = 400_000, 50
EXTRAPOLATE = 1.5  # how far past the dense runs' FLOPs range their curve is extended for the isoFLOP verdict
SEEDS = (0, 1, 2)
QUICK = ("model.dim=32", "model.num_heads=2", "tokenizer=bytes", "data.seq_len=32", "data.max_eval_tokens=2000",
         "trainer.threshold_scan=[0.0,0.5]", "trainer.eval_batch_size=16", "wandb=disabled")  # fmt: skip
QUICK_BUDGETS = {"100k": (2_000, 1), "200k": (4_000, 1), "400k": (8_000, 1), "800k": (16_000, 1), "1.6M": (16_000, 2),
                 "2.4M": (16_000, 3), "3.2M": (16_000, 4)}  # fmt: skip
# the untuned study's report points to the tuned one, which holds the learning-rate sweep and the chosen rates
PEER_POINTER = ["Every method here runs at its preset's learning rate. LEGO against Mixture-of-Depths and LayerSkip, "
                "with each method's learning rate swept and chosen on validation (the sweep's table and the chosen "
                "rates are in its *Learning rates* section): `python experiments/compare_methods.py --peers`, "
                "docs/peers.md.", ""]  # fmt: skip
# files a finished run does not need for its report (a stage dump is up to 1 GB)
DISPOSABLE = ("hard_tokens*.safetensors", "val_routed*.safetensors", "checkpoint.pt")


@dataclass(frozen=True)
class Job:
    method: str
    budget: str
    seed: int
    lr: float | None = None  # every trained stage's learning rate; None: the method's preset's

    @property
    def name(self) -> str:
        tag = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"{slug(self.method)}{tag}/{self.budget}/seed{self.seed}"


def slug(text: str) -> str:
    """A folder name Hydra accepts in an override (no spaces, commas, parentheses or '=')."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text.replace("=", "")).strip("_")


def jobs_for(
    methods: list[str], budgets: list[str], seeds: list[int], rates: dict[str, float] | None = None
) -> list[Job]:
    """Budget-major, then seed, then method: a study stopped early has whole budgets and balanced seeds. `rates`:
    each method's tuned learning rate (`chosen_rates`); a method without one, or whose chosen rate is its preset's
    (PRESET_LR), runs at its preset's: the same job as an untuned study's."""
    rates = {method: lr for method, lr in (rates or {}).items() if lr != PRESET_LR}
    return [
        Job(method, budget, seed, rates.get(method))
        for budget in budgets
        for seed in seeds
        for method in methods
        if METHODS[method].budgets is None or budget in METHODS[method].budgets
    ]


def sweep_jobs(methods: list[str], budget: str = TUNE_BUDGET) -> list[Job]:
    """The learning-rate sweep: every method at every rate of LR_GRID, seed 0, at `budget`."""
    return [Job(method, budget, 0, lr) for method in methods for lr in LR_GRID]


def chosen_rates(sweep_dir: Path, methods: list[str], budget: str = TUNE_BUDGET) -> dict[str, float]:
    """Each method's rate with the lowest validation objective among its finished sweep runs at `budget` in
    `sweep_dir` (methods with fewer than two finished rates are left out: nothing was chosen)."""
    chosen = {}
    for method in methods:
        finished = [job for job in sweep_jobs([method], budget) if (sweep_dir / job.name / "results.json").is_file()]
        scored = [(read_json(sweep_dir / job.name / "results.json")["objective"], job.lr) for job in finished]
        if len(scored) >= 2:
            chosen[method] = min(scored)[1]
    return chosen


def job_overrides(job: Job, quick: bool) -> list[str]:
    method = METHODS[job.method]
    tokens, epochs = (QUICK_BUDGETS if quick else BUDGETS)[job.budget]
    full_tokens, full_epochs = BUDGETS[job.budget]
    warmup = max(1, round(REFERENCE_WARMUP * full_tokens * full_epochs / REFERENCE_TOKENS))
    schedule = [f"block_schedule.blocks.{k}.epochs={epochs}" for k in range(method.blocks)]
    if warmup != REFERENCE_WARMUP:
        schedule += [f"block_schedule.blocks.{k}.warmup_steps={warmup}" for k in range(method.blocks)]
    if job.lr is not None:
        schedule += [f"block_schedule.blocks.{k}.lr={job.lr:g}" for k in range(method.blocks)]
    quick_sizes = QUICK if quick else ()
    return [*method.overrides, f"data.max_train_tokens={tokens}", *schedule, f"seed={job.seed}", *quick_sizes]


def with_preset_stand_ins(source: Path, jobs: list[Job]) -> tuple[list[Job], list[str]]:
    """`jobs` for a report: a tuned job not finished in `source` whose preset-rate twin is, replaced by that twin, and
    the methods so replaced (the report must say so)."""
    done = lambda job: (source / job.name / "results.json").is_file()  # noqa: E731
    replaced, stand_ins = [], []
    for job in jobs:
        twin = Job(job.method, job.budget, job.seed)
        if job.lr is not None and not done(job) and done(twin):
            replaced.append(twin)
            stand_ins += [job.method] if job.method not in stand_ins else []
        else:
            replaced.append(job)
    return replaced, stand_ins


def run_job(job: Job, out: Path, quick: bool, threads: int | None, keep_dumps: bool) -> str:
    run_dir = out / job.name
    if (run_dir / "results.json").is_file():
        return f"{job.name}: done before, skipped"
    # holds the pid of the study running this job; beside the run directory, which only LEGO's own files may enter
    lock = run_dir.with_name(f".{run_dir.name}.study.lock")
    if lock.is_file() and _alive(int(lock.read_text() or 0)):
        return f"{job.name}: being run by process {lock.read_text()}, skipped"
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        return _run(job, run_dir, quick, threads, keep_dumps)
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def _run(job: Job, run_dir: Path, quick: bool, threads: int | None, keep_dumps: bool) -> str:
    command = [sys.executable, str(REPO / "train.py"), *job_overrides(job, quick), f"hydra.run.dir={run_dir}",
               "trainer.progress=false", *([f"trainer.num_threads={threads}"] if threads else [])]  # fmt: skip
    with open(run_dir / "study.log", "a") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        return f"{job.name}: FAILED (exit {done.returncode}); see {run_dir / 'study.log'}"
    if not keep_dumps:
        for pattern in DISPOSABLE:
            for path in run_dir.glob(f"stage_*/{pattern}"):
                path.unlink()
    results = read_json(run_dir / "results.json")
    return f"{job.name}: test PPL {results['test_ppl']:.2f}, {results['wall_seconds']:.0f}s"


def run_all(jobs: list[Job], out: Path, archive: Path | None, quick: bool, parallel: int, keep_dumps: bool) -> None:
    """Run the jobs not finished in `out` or `archive`, `parallel` at a time (each with cores / parallel
    threads); failures are reported, not raised, so one broken run does not stop a study of hours."""
    pending = [job for job in jobs if not any((d / job.name / "results.json").is_file() for d in (out, archive) if d)]
    print(f"{len(jobs)} runs, {len(jobs) - len(pending)} already finished, {len(pending)} to run", flush=True)
    if not pending:
        return
    _warm_data_cache(pending[0], quick)  # parallel jobs then only read the tokenizer and token caches
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_job, job, out, quick, threads, keep_dumps) for job in pending]
        for i, future in enumerate(as_completed(futures), 1):
            elapsed = time.monotonic() - started
            left = f", about {_minutes(elapsed / i * (len(pending) - i))} to go" if i < len(pending) else ""
            print(f"[{i}/{len(pending)}] {future.result()} ({_minutes(elapsed)} in{left})", flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _warm_data_cache(job: Job, quick: bool) -> None:
    """Tokenize the corpus once, before any parallel job would race to fill the cache."""
    from hydra import compose, initialize_config_dir

    from lego.data import prepare_data
    from lego.pipeline.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = to_run_config(compose("config", overrides=job_overrides(job, quick)))
    prepare_data(run.data, run.tokenizer, cache_dir=run.cache_dir, progress=False)


# --- The verdicts ----------------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean, sample standard deviation and count of one metric over a config's seeds."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        mean, sd, n = mean_sd_n(values)
        return cls(math.nan if mean is None else mean, math.nan if sd is None else sd, n)

    def __str__(self) -> str:
        if self.n == 0:
            return "-"
        spread = f" ± {self.sd:.2f}" if math.isfinite(self.sd) else ""
        return f"{self.mean:.2f}{spread}"

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.nan


def verdict(lego: Stat, dense: Stat) -> str:
    """'ahead' / 'behind' when the difference of means exceeds twice its standard error, else 'within noise'
    (lower PPL is better)."""
    if lego.n < 2 or dense.n < 2:
        return "too few seeds to tell"
    se = math.hypot(lego.se, dense.se)
    diff = lego.mean - dense.mean
    word = "within noise" if abs(diff) <= 2 * se else ("ahead" if diff < 0 else "behind")
    return f"{word} ({diff / dense.mean:+.1%} ± {2 * se / dense.mean:.1%})"


def interpolate_log(points: list[tuple[float, float]], x: float) -> tuple[float, bool] | None:
    """(y at x, extrapolated?) on the piecewise-linear curve through (log x, log y) points. Past either end the
    end segment is extended, by at most EXTRAPOLATE x; further out, or with fewer than two points, None."""
    points = sorted(points)
    if len(points) < 2 or not points[0][0] / EXTRAPOLATE <= x <= points[-1][0] * EXTRAPOLATE:
        return None
    segments = list(zip(points, points[1:], strict=False))
    end = segments[0 if x < points[0][0] else -1]
    (x0, y0), (x1, y1) = next(((a, b) for a, b in segments if a[0] <= x <= b[0]), end)
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
    return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0))), not points[0][0] <= x <= points[-1][0]


def archive_runs(out: Path, archive: Path, jobs: list[Job]) -> int:
    """Copy what the reports read of each finished run (results.json, .hydra/config.yaml, overrides.yaml) from
    `out` into `archive`: a few kB a run, committed with the docs, so the published numbers can be re-derived
    (`--report-only`) and a later study resumes from them without the run folders."""
    return sum(_copy_run(out / job.name, archive / job.name) for job in jobs)


def _copy_run(source: Path, target: Path) -> bool:
    """Copy a finished run's report files from `source` to `target` unless `target` has finished: whether it did."""
    if not (source / "results.json").is_file() or (target / "results.json").is_file():
        return False
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "results.json"):  # results.json last: complete
        atomic_write(target / name, lambda tmp, path=source / name: shutil.copyfile(path, tmp))
    return True


def adopt_twins(jobs: list[Job], target: Path, sources: list[Path], twin: Callable[[Job], Job | None]) -> int:
    """Copy into `target` each job's `twin` (the same run under another name) finished in one of `sources`, so that
    it is not trained twice: the sweep's seed-0 run at a rate is the comparison's seed-0 run at that rate when the
    sweep runs at a compared budget. Returns how many were copied."""
    copied = 0
    for job in jobs:
        other = twin(job)
        if other is not None:
            copied += any(_copy_run(source / other.name, target / job.name) for source in sources)
    return copied


def comparison_twin(job: Job) -> Job:
    """A sweep job as the comparison names it (a rate equal to the presets' is the untuned job)."""
    return Job(job.method, job.budget, job.seed, None if job.lr == PRESET_LR else job.lr)


def sweep_twin(tune_budget: str) -> Callable[[Job], Job | None]:
    """A comparison job as the sweep at `tune_budget` names it, if the sweep has it (seed 0 at that budget)."""
    return lambda job: (
        Job(job.method, job.budget, 0, job.lr or PRESET_LR) if job.seed == 0 and job.budget == tune_budget else None
    )


def group_runs(out: Path, jobs: list[Job]) -> dict[tuple[str, str], list[dict]]:
    """Finished runs' results by (method, budget)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for job in jobs:
        path = out / job.name / "results.json"
        if path.is_file():
            groups.setdefault((job.method, job.budget), []).append(read_json(path))
    return groups


def stat(runs: list[dict], key: str) -> Stat:
    return Stat.of([run.get(key) for run in runs])


def budget_lines(
    groups: dict[tuple[str, str], list[dict]], budgets: list[str], dense_budgets: Sequence[str] = ()
) -> list[str]:
    """Per budget: the table (mean ± sd over seeds) and the LEGO-vs-dense verdicts; dense's isoFLOP curve also
    runs through its runs at `dense_budgets` (listed in a table of their own)."""
    dense_curve = []  # (mean train FLOPs, mean test PPL) per budget, for the isoFLOP interpolation
    for budget in sorted({*budgets, *dense_budgets}, key=_budget_tokens):
        runs = groups.get((DENSE, budget))
        if runs and len(runs) >= 2:  # a single seed is no point to compare against
            dense_curve.append((stat(runs, "train_flops").mean, stat(runs, "test_ppl").mean))
    lines = dense_curve_lines(groups, budgets, dense_budgets)
    for budget in budgets:
        rows = [(method, groups[(method, budget)]) for method in METHODS if (method, budget) in groups]
        if not rows:
            continue
        tokens, epochs = BUDGETS[budget]
        lines += [
            f"### {budget} training tokens ({tokens:,} tokens x {epochs} epoch{'s' if epochs > 1 else ''})",
            "",
            "| method | seeds | test PPL | full depth PPL | honest cost | train FLOPs vs dense | speed-up (median) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        dense = groups.get((DENSE, budget))
        dense_flops = stat(dense, "train_flops").mean if dense else math.nan
        for method, runs in rows:
            flops = Stat.of([run["train_flops"] / dense_flops for run in runs])
            exits = not _dense(method) and any(run["shallow_ratio"] > 0 for run in runs)  # else no speed-up to time
            speedup = stat(runs, "inference_speedup") if exits else Stat(math.nan, math.nan, 0)
            lines.append(
                f"| {method} | {len(runs)} | {stat(runs, 'test_ppl')} | {stat(runs, 'test_ppl_full_depth')} | "
                f"{stat(runs, 'honest_cost')} | {flops} | {speedup} |"
            )
        lines.append("")
        if not dense:
            lines += ["No finished dense run at this budget: no verdict.", ""]
            continue
        dense_ppl = stat(dense, "test_ppl")
        for method, runs in rows:
            if _dense(method):
                continue
            calibrated, full = stat(runs, "test_ppl"), stat(runs, "test_ppl_full_depth")
            flops = stat(runs, "train_flops").mean
            iso = interpolate_log(dense_curve, flops)
            iso_text = (
                f"dense {'extrapolated' if iso[1] else 'interpolated'} to {method}'s {flops / dense_flops:.2f}x FLOPs: "
                f"{iso[0]:.2f}, {method} {verdict(calibrated, Stat(iso[0], dense_ppl.sd, dense_ppl.n))}"
                if iso is not None
                else f"its {flops / dense_flops:.2f}x dense FLOPs is outside the dense runs' range"
            )
            lines.append(
                f"- **{method}**: at equal training FLOPs, {iso_text}. At equal inference cost (full depth, honest "
                f"cost 1.0 like dense): {verdict(full, dense_ppl)}. With early exit (honest cost "
                f"{stat(runs, 'honest_cost').mean:.2f}) against dense at 1.0: {verdict(calibrated, dense_ppl)}."
            )
        lines.append("")
    return lines


def dense_curve_lines(
    groups: dict[tuple[str, str], list[dict]], budgets: list[str], dense_budgets: Sequence[str]
) -> list[str]:
    """Dense's runs at the budgets only it runs at: the points its isoFLOP curve passes through between the
    compared budgets, so that an equal-training-FLOPs verdict interpolates over a short span."""
    measured = [b for b in dense_budgets if (DENSE, b) in groups]
    if not measured:
        return []
    largest = max(budgets, key=_budget_tokens)
    reference = stat(groups[(DENSE, largest)], "train_flops").mean if (DENSE, largest) in groups else math.nan
    lines = [
        "### Dense between the budgets",
        "",
        f"Dense alone also ran at {' and '.join(measured)} tokens: points on its curve of test PPL against training "
        "FLOPs (the plot above) through which every equal-training-FLOPs verdict below interpolates.",
        "",
        f"| budget | seeds | test PPL | train FLOPs vs dense at {largest} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for budget in sorted({*measured, *budgets}, key=_budget_tokens):
        runs = groups.get((DENSE, budget))
        if runs:
            flops = Stat.of([run["train_flops"] / reference for run in runs])
            lines.append(f"| {budget} | {len(runs)} | {stat(runs, 'test_ppl')} | {flops} |")
    return [*lines, ""]


def mod_routing_lines(groups: dict[tuple[str, str], list[dict]], budgets: list[str]) -> list[str]:
    """How Mixture-of-Depths' test PPL was scored (its routing at evaluation) and what the non-causal top-k
    routing of training would have scored, per budget."""
    lines = []
    for budget in budgets:
        runs = [run for run in groups.get(("MoD", budget), []) if run.get("mod")]
        if not runs:
            continue
        shares = Stat.of([fmean(run["mod"]["test_routed_share"].values()) for run in runs])
        kind, _, rule = runs[0]["mod"]["test_ppl_routing"].partition(": ")
        lines.append(
            f"- {budget}: test PPL {stat(runs, 'test_ppl')} with {kind} routing ({rule}), routing "
            f"{shares.mean:.1%} of the test tokens per routed layer (training's capacity "
            f"{runs[0]['mod']['capacity']:.1%}); training's top-k routing, which reads later tokens, would score "
            f"{Stat.of([run['mod']['test_ppl_topk'] for run in runs])}."
        )
    return ["## How Mixture-of-Depths was scored", "", *lines, ""] if lines else []


def _dense(method: str) -> bool:
    """A dense baseline (no verdict of its own): `dense` and its variants."""
    return method.startswith("dense")


def lr_sweep_lines(
    sweep_dir: Path, methods: list[str], rates: dict[str, float], budget: str = TUNE_BUDGET
) -> list[str]:
    """The learning-rate sweep's table: each method's validation objective at each rate, the chosen one in bold;
    below it, the same methods' sweeps at other budgets found in `sweep_dir` (shown, not used: their lowest in
    italics)."""
    header = " | ".join(f"lr {lr:g}" for lr in LR_GRID)
    lines = [
        "## Learning rates",
        "",
        f"Each method's learning rate is tuned, not inherited: seed 0 at {budget} tokens at each rate, the "
        "lowest validation objective (validation PPL with the calibrated exits; never a test number) chosen; the "
        "comparison above runs every method at its chosen rate (a method not tuned: at its preset's).",
        "",
        f"| method | budget | {header} | chosen |",
        f"| --- | --- | {' | '.join('---:' for _ in LR_GRID)} | ---: |",
    ]
    others = sorted({path.parent.name for path in sweep_dir.glob("*/*/seed0")} - {budget}, key=_budget_tokens)
    for method in methods:
        at_edge = rates.get(method) in (LR_GRID[0], LR_GRID[-1])
        edge = " (the grid's edge: a wider sweep may choose beyond it)" if at_edge else ""
        chosen = f"{rates[method]:g}{edge}" if method in rates else "not tuned: its preset's"
        cells = _sweep_cells(sweep_dir, method, budget, rates.get(method), "**")
        lines.append(f"| {method} | {budget} | {' | '.join(cells)} | {chosen} |")
        for other in others:
            cells = _sweep_cells(sweep_dir, method, other, chosen_rates(sweep_dir, [method], other).get(method), "*")
            if any(cell != "-" for cell in cells):
                lines.append(f"| {method} | {other} | {' | '.join(cells)} | not used |")
    return [*lines, ""]


def _sweep_cells(sweep_dir: Path, method: str, budget: str, marked: float | None, mark: str) -> list[str]:
    cells = []
    for job in sweep_jobs([method], budget):
        path = sweep_dir / job.name / "results.json"
        value = f"{read_json(path)['objective']:.2f}" if path.is_file() else "-"
        cells.append(f"{mark}{value}{mark}" if marked == job.lr else value)
    return cells


def _budget_tokens(budget: str) -> int:
    tokens, epochs = BUDGETS[budget]
    return tokens * epochs


def plot_frontier(groups: dict[tuple[str, str], list[dict]], budget: str, path: Path) -> bytes:
    """The quality / inference-cost frontier at one budget: test PPL against honest inference cost along each
    method's threshold scan (mean over seeds per exit share, a band of ± the seed sd); a method without early
    exit is one point with error bars."""
    from lego.report.plots import plot_series

    series = {}
    for (method, run_budget), runs in groups.items():
        if run_budget != budget:
            continue
        shares = sorted({row["target_exit_share"] for run in runs for row in run.get("threshold_scan", [])})
        points = []
        for share in shares:
            rows = [row for run in runs for row in run["threshold_scan"] if row["target_exit_share"] == share]
            cost, ppl = Stat.of([r["honest_cost"] for r in rows]), Stat.of([r["test_ppl"] for r in rows])
            points.append({"x": cost.mean, "y": ppl.mean, "xerr": cost.sd, "yerr": ppl.sd, "label": ""})
        series[method] = points
    return plot_series(
        series, path, xlabel="honest inference cost (x dense)", ylabel="test PPL",
        title=f"Quality vs inference cost, {budget} tokens (threshold scans; bands and bars: sd over seeds)",
        band=True,
    )  # fmt: skip


FRONTIER_COST = 0.75  # the frontier verdict: the best test PPL at an honest inference cost of at most this


def ppl_within_cost(run: dict, cost: float = FRONTIER_COST) -> float | None:
    """A run's lowest test PPL at an honest cost of at most `cost` along its threshold scan (linear in cost
    between neighbouring scan points, so a curve crossing `cost` counts there); None when it is never that cheap."""
    points = sorted((row["honest_cost"], row["test_ppl"]) for row in run.get("threshold_scan") or [])
    within = [ppl for c, ppl in points if c <= cost]
    for (c0, p0), (c1, p1) in zip(points, points[1:], strict=False):
        if c0 <= cost < c1:
            within.append(p0 + (p1 - p0) * (cost - c0) / (c1 - c0))
    return min(within, default=None)


def frontier_verdict(groups: dict[tuple[str, str], list[dict]], budget: str) -> str:
    """Which method is on the frontier at FRONTIER_COST: each method's `ppl_within_cost` over its seeds, the best
    against the runner-up by the two-standard-error rule."""
    scored, never = [], []
    for (method, run_budget), runs in groups.items():
        values = [ppl_within_cost(run) for run in runs] if run_budget == budget else []
        if run_budget == budget and all(v is not None for v in values):
            scored.append((Stat.of(values), method))
        elif run_budget == budget:
            never.append(method)
    scored.sort(key=lambda item: item[0].mean)
    cells = ", ".join(f"{method} {stat}" for stat, method in scored) or "none"
    text = f"At an inference cost of at most {FRONTIER_COST:g}x dense's, the best test PPL per method: {cells}"
    if never:
        text += f"; never that cheap: {', '.join(sorted(never))}"
    if len(scored) >= 2:
        (best, name), others = scored[0], scored[1:]
        against = "; ".join(f"against {other}: {verdict(best, stat)}" for stat, other in others)
        text += f". On the frontier: **{name}**; {against}"
    return text + "."


def frontier_lines(groups: dict[tuple[str, str], list[dict]], budgets: list[str], report_path: Path) -> list[str]:
    """One frontier plot per budget (`plot_frontier`) and its verdict (`frontier_verdict`)."""
    lines = ["## Quality against inference cost", ""]
    for budget in budgets:
        if any(run_budget == budget for _, run_budget in groups):
            path = report_path.with_name(f"{report_path.stem}_frontier_{budget}.png")
            plot_frontier(groups, budget, path)
            lines += [f"![test PPL vs honest inference cost at {budget} tokens]({path.name})", "",
                      f"{budget}: {frontier_verdict(groups, budget)}", ""]  # fmt: skip
    return lines


def dense_gap_lines(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """The two dense baselines (one architecture, two training code paths) against their seed spread."""
    universal = groups.get(("dense (Universal Standard)", "400k"))
    lego_path = groups.get((DENSE, "400k"))
    if not universal or not lego_path:
        return []
    a, b = stat(lego_path, "test_ppl"), stat(universal, "test_ppl")
    word = verdict(b, a).replace("ahead", "better than LEGO's").replace("behind", "worse than LEGO's")
    word = word.replace("within noise", "within noise of LEGO's")
    return [
        "## The two dense baselines",
        "",
        f"At 400k tokens the same 4-layer architecture scores test PPL {a} through LEGO's training code "
        f"(`+experiment=compare_dense_block`) and {b} through the Universal joint trainer's Standard preset "
        f"(`+experiment=compare_dense`): Universal's path is {word}.",
        "",
        "The earlier single-seed table had them 6.5 % apart. Reading both code paths found three differences, "
        "two of them fixed by this study's code:",
        "",
        "- **Fixed: gradient clipping.** LEGO clipped its exit classifier's gradient together with the language "
        "model's (one norm, `grad_clip` 1.0). The classifier reads a detached input, yet its gradient, several "
        "times the LM's norm early in training, shrank every LM step of every LEGO block. It is now clipped on "
        "its own (`tests/model/test_semantics.py::test_exit_classifier_training_never_changes_the_language_model`"
        ": the LM weights are the same with or without the exit loss). Every LEGO number here is after the fix.",
        "- **Fixed: weight decay.** Universal decayed the norm gains too; it now decays matrices only and uses "
        "the fused AdamW kernel, exactly as LEGO (`lego.fitting.param_groups`).",
        "- **Left, by design: the initial weight sample.** At the same seed the two models draw different "
        "initial weights (same distribution), because Universal's four one-layer blocks each create an exit "
        "classifier, drawn between the layers. Everything else is the same: AdamW betas and epsilon, learning "
        "rate, warm-up and cosine schedule, batch size, clipping, data order, loss, one validation at the end, "
        "and the evaluation code. What remains between them is therefore seed noise, which is what the spread "
        "above measures.",
        "",
    ]


def moe_lines(groups: dict[tuple[str, str], list[dict]], plot_path: Path) -> list[str]:
    """Each MoE method against its dense-FFN twin at 400k tokens: PPL verdicts, the experts' load and a plot."""
    pairs = [(moe, dense) for moe, dense in MOE_PAIRS.items() if (moe, "400k") in groups and (dense, "400k") in groups]
    if not pairs:
        return []
    plot_moe(groups, pairs, plot_path)
    lines = [
        "## Mixture of Experts",
        "",
        "Every layer's SwiGLU (*in Block 1*: only Block 1's layers, where the hard tokens go) replaced by 8 "
        "experts of half its width, top-2 routing, auxiliary loss + router z-loss (`moe=e8_top2_aux`): the same "
        "active FLOPs per token, 4x those FFNs' parameters, at 400k tokens.",
        "",
        f"![test PPL of experts and dense FFNs]({plot_path.name})",
        "",
        "| method | seeds | test PPL | its dense-FFN twin | experts vs dense FFNs | honest cost | max/mean load |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for moe, dense in pairs:
        runs, twins = groups[(moe, "400k")], groups[(dense, "400k")]
        ppl, twin = stat(runs, "test_ppl"), stat(twins, "test_ppl")
        imbalance = Stat.of([max((row["imbalance"] for row in run.get("moe") or []), default=None) for run in runs])
        lines.append(
            f"| {moe} | {len(runs)} | {ppl} | {twin} ({dense}) | {verdict(ppl, twin)} | "
            f"{stat(runs, 'honest_cost')} | {imbalance} |"
        )
    return [*lines, "", "*ahead* means the experts give the lower test PPL (same rule as above).", ""]


def plot_moe(groups: dict[tuple[str, str], list[dict]], pairs: list[tuple[str, str]], path: Path) -> bytes:
    """Test PPL against honest inference cost at 400k tokens: one line through the dense-FFN methods, one
    through their twins with experts in every layer, one through those with experts in Block 1 only; error
    bars = seed sd; the dense-FFN points are labelled, each MoE point sits at its twin's inference cost."""
    from lego.report.plots import plot_series

    def point(method: str, label: str) -> dict:
        cost, ppl = stat(groups[(method, "400k")], "honest_cost"), stat(groups[(method, "400k")], "test_ppl")
        return {"x": cost.mean, "y": ppl.mean, "xerr": cost.sd, "yerr": ppl.sd, "label": label}

    twins = dict.fromkeys(dense for _, dense in pairs)  # each once, in order
    series: dict[str, list[dict]] = {"dense FFNs": [point(dense, dense) for dense in twins]}
    for moe, _ in pairs:
        later_only = "model.moe.layers=later_blocks" in METHODS[moe].overrides
        where = "experts in Block 1 only" if later_only else "experts in every layer"
        series.setdefault(where, []).append(point(moe, ""))  # beside its twin: the twin's label says which
    return plot_series(
        series, path, xlabel="honest inference cost (x dense)", ylabel="test PPL (early exit)",
        title="Experts (8, top-2) vs dense FFNs, 400k tokens (error bars: sd over seeds)",
    )  # fmt: skip


def plot_isoflop(groups: dict[tuple[str, str], list[dict]], budgets: list[str], path: Path) -> bytes:
    """Test PPL against training FLOPs, one line per method over the budgets, error bars = seed sd."""
    from lego.report.plots import plot_series

    series = {}
    for method in METHODS:
        if method in MOE_PAIRS:
            continue  # one budget only: plotted against their dense-FFN twins in the MoE section
        points = []
        for budget in budgets:
            runs = groups.get((method, budget))
            if runs:
                flops, ppl = stat(runs, "train_flops"), stat(runs, "test_ppl")
                points.append({"x": flops.mean, "y": ppl.mean, "xerr": flops.sd, "yerr": ppl.sd, "label": budget})
        if points:
            series[method] = points
    return plot_series(
        series, path, xlabel="training FLOPs (steps + hard-token collection)", ylabel="test PPL (early exit)",
        title="Test PPL vs training compute (error bars: sd over seeds)", log_x=True, log_y=True,
    )  # fmt: skip


def report(
    out: Path,
    jobs: list[Job],
    budgets: list[str],
    report_path: Path,
    command: str,
    lr_lines: list[str] | None = None,
    dense_budgets: Sequence[str] = (),
) -> str:
    """docs/results.md (or `report_path`): the verdicts per budget, the plots, and with `lr_lines` (a tuned study)
    the learning-rate sweep and each budget's quality / inference-cost frontier. `dense_budgets`: where dense
    alone ran, for its isoFLOP curve."""
    groups = group_runs(out, jobs)
    if not any(method == DENSE for method, _ in groups):
        raise SystemExit(f"error: no finished dense run in {out}; run the study first")
    plot_path = report_path.with_name(f"{report_path.stem}_isoflop.png")
    every_budget = sorted({*budgets, *dense_budgets}, key=_budget_tokens)
    plot_isoflop(groups, every_budget, plot_path)
    shown = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
    any_run = next(iter(groups.values()))[0]
    lines = [
        f"# Results: LEGO {'against its peers' if lr_lines is not None else 'vs dense over seeds and token budgets'}",
        "",
        f"Made by `{command}`. Every finished run's results are kept in `{shown}`: `--report-only` rewrites "
        "this file and the study's sweep report (`report.html`, `summary.csv`, `summary_by_config.csv` in the "
        "study folder: `--out`, by default `outputs/peers` with `--peers`, else `outputs/compare`) from them, and a "
        "re-run of the study skips them.",
        f"Corpus: {any_run['data']['source']}, test set {any_run['test_tokens']:,} tokens (the same for every run: "
        f"`data.split_seed` is fixed), vocab {any_run['data']['vocab_size']:,}; every model dim 256, 4 layers.",
        "",
        "Each cell is the mean ± sample standard deviation over seeds (n runs). *test PPL* uses each run's "
        "calibrated early exit, *full depth* the same model with no exit. *honest cost* counts every inference "
        "FLOP (K/V of kept tokens, attention, head) over the dense forward. *train FLOPs vs dense* counts "
        "training steps plus, for LEGO, the forward that scores the next block's hard tokens. *speed-up* is the "
        "median over alternating timing rounds of full-depth over early-exit wall time (mean of the runs' "
        "medians). A verdict calls LEGO *ahead* or *behind* only when the difference of means exceeds twice "
        "its standard error (the ± after the difference is that bound); otherwise *within noise*. At equal "
        "training FLOPs dense's PPL is read off its curve through the dense budgets' means (straight in log "
        f"FLOPs and log PPL between them, *extrapolated* past them by at most {EXTRAPOLATE:g}x): the ± leaves out that "
        "curve's own error, which is smaller the closer together the dense budgets are.",
        "",
        f"![test PPL vs training FLOPs]({plot_path.name})",
        "",
        *(PEER_POINTER if lr_lines is None else []),
        *budget_lines(groups, budgets, dense_budgets),
        *(frontier_lines(groups, budgets, report_path) if lr_lines is not None else []),
        *mod_routing_lines(groups, budgets),
        *(lr_lines or []),
        *dense_gap_lines(groups),
        *moe_lines(groups, report_path.with_name(f"{report_path.stem}_moe.png")),
    ]
    missing = [job.name for job in jobs if not (out / job.name / "results.json").is_file()]
    if missing:
        per_budget = ", ".join(f"{b}: {sum(m.split('/')[1] == b for m in missing)}" for b in every_budget
                               if any(m.split("/")[1] == b for m in missing))  # fmt: skip
        lines += [f"Not run yet: {len(missing)} of {len(jobs)} runs ({per_budget}); a re-run of the study "
                  "resumes them.", ""]  # fmt: skip
    text = "\n".join(lines)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the study folder (default: outputs/compare)")
    parser.add_argument("--report", type=Path, help="default: docs/results.md")
    parser.add_argument("--archive", type=Path,
                        help="finished runs' results are copied here and the reports read them from here "
                             "(default: docs/study_runs)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="only write the reports from finished runs")
    parser.add_argument("--runs-only", action="store_true", help="only run (or resume) the study, no reports")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all but the peers")
    parser.add_argument("--budgets", nargs="+", choices=list(BUDGETS),
                        help=f"training-token budgets, in the order given (default: {' '.join(DEFAULT_BUDGETS)})")
    parser.add_argument("--dense-budgets", nargs="*", choices=list(BUDGETS),
                        help="budgets where dense alone runs too, for its curve of PPL against training FLOPs "
                             f"(default: {' '.join(PEER_DENSE_BUDGETS)} with --peers, else none)")  # fmt: skip
    parser.add_argument("--tune-lr", action="store_true",
                        help=f"first sweep each method's learning rate ({', '.join(map(str, LR_GRID))}) at "
                             "--tune-budget, then compare at the chosen rates")  # fmt: skip
    parser.add_argument("--tune-budget", choices=list(BUDGETS),
                        help=f"the learning-rate sweep's budget (default: {PEER_TUNE_BUDGET} with --peers, "
                             f"else {TUNE_BUDGET})")  # fmt: skip
    parser.add_argument("--peers", action="store_true",
                        help="the peer study: dense, LEGO r=0.3/0.5, MoD, LayerSkip at 800k and 3.2M tokens (dense "
                             "also at 1.6M and 2.4M), learning rates tuned at 800k, into outputs/peers, "
                             "docs/peers.md and docs/peer_runs")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--keep-dumps", action="store_true", help="keep each stage's hard-token dump")
    args = parser.parse_args(argv)
    study = ("peers", "peers.md", "peer_runs") if args.peers else ("compare", "results.md", "study_runs")
    args.out = args.out or REPO / "outputs" / study[0]
    args.report = args.report or REPO / "docs" / study[1]
    args.archive = args.archive or REPO / "docs" / study[2]
    args.methods = args.methods or list(PEER_STUDY if args.peers else (m for m in METHODS if m not in PEERS))
    for key, default in study_defaults(args.peers).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.tune_lr = args.tune_lr or args.peers
    return args


def study_defaults(peers: bool) -> dict[str, list[str] | str]:
    """The budgets, dense's extra budgets and the tuning budget of the peer study or of the untuned one: what an
    option left out means, and what the report's command line leaves out."""
    if peers:
        return {"budgets": list(PEER_BUDGETS), "dense_budgets": list(PEER_DENSE_BUDGETS),
                "tune_budget": PEER_TUNE_BUDGET}
    return {"budgets": list(DEFAULT_BUDGETS), "dense_budgets": [], "tune_budget": TUNE_BUDGET}


def tune_rates(args: argparse.Namespace) -> tuple[dict[str, float], list[str]]:
    """Run (or resume) the learning-rate sweep in `<out>/lr_sweep`, archive it, and return each method's chosen
    rate and the report's table of the sweep."""
    sweep = sweep_jobs(args.methods, args.tune_budget)
    out, archive = args.out / "lr_sweep", args.archive / "lr_sweep" if args.archive else None
    if not args.report_only:
        adopt_twins(sweep, archive or out, [d for d in (args.archive, args.out) if d], comparison_twin)
        run_all(sweep, out, archive, args.quick, args.jobs, args.keep_dumps)
    if archive:
        archive_runs(out, archive, sweep)
    rates = chosen_rates(archive or out, args.methods, args.tune_budget)
    print("learning rates chosen on validation:", ", ".join(f"{m} {lr:g}" for m, lr in rates.items()) or "none")
    return rates, lr_sweep_lines(archive or out, args.methods, rates, args.tune_budget)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    rates, lr_lines = tune_rates(args) if args.tune_lr else ({}, None)
    dense_only = [b for b in args.dense_budgets if b not in args.budgets] if DENSE in args.methods else []
    jobs = jobs_for(args.methods, args.budgets, args.seeds, rates) + jobs_for([DENSE], dense_only, args.seeds, rates)
    if not args.report_only:
        if args.tune_lr:
            sweeps = [d / "lr_sweep" for d in (args.archive, args.out) if d]
            adopt_twins(jobs, args.archive or args.out, sweeps, sweep_twin(args.tune_budget))
        run_all(jobs, args.out, args.archive, args.quick, args.jobs, args.keep_dumps)
    if args.archive:
        print(f"{archive_runs(args.out, args.archive, jobs)} finished runs archived in {args.archive}")
    if args.runs_only:
        return ""
    from lego.report import write_report

    source = args.archive or args.out
    if not any(source.glob("*/*/*/results.json")):
        raise SystemExit(f"error: no finished run in {source}; run the study first (without --report-only)")
    files = write_report([source], args.out, title="LEGO vs dense: seeds and budgets")
    print(f"sweep report: {files.html} ({files.finished} runs)")
    command = "python experiments/compare_methods.py" + (" --peers" if args.peers else "")
    command += " --quick" if args.quick else ""
    defaults = study_defaults(args.peers)
    if args.tune_lr and args.tune_budget != defaults["tune_budget"]:
        command += f" --tune-budget {args.tune_budget}"
    for key in ("budgets", "dense_budgets"):
        if getattr(args, key) != defaults[key]:
            command += " " + " ".join([f"--{key.replace('_', '-')}", *getattr(args, key)])
    by_size = sorted(args.budgets, key=_budget_tokens)
    jobs, stand_ins = with_preset_stand_ins(source, jobs)
    if stand_ins and lr_lines is not None:
        lr_lines += [
            f"Not run yet at their chosen rates: {', '.join(stand_ins)}. Until they are, the tables and plots above "
            f"show these methods at their preset's rate ({PRESET_LR:g}): a tuning advantage for the others.",
            "",
        ]
    text = report(source, jobs, by_size, args.report, command, lr_lines, dense_only)
    print(text)
    return text


if __name__ == "__main__":
    main()
