"""A real Optuna sweep over hard_ratio (hydra-optuna-sweeper): it tunes the validation objective that train.py
returns, never a test number, and its report comes out like any multirun's."""

import csv
import json

import yaml

from tests.launch import run_train


def test_optuna_sweep_tunes_validation_and_gets_a_report(tmp_path, cache_dir):
    sweep = tmp_path / "optuna"
    proc = run_train(
        "-m", "+experiment=tiny", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
        "hard_ratio.value=interval(0.2,0.8)", "data.max_train_tokens=20000", "trainer.threshold_scan=[0.0,0.5]",
        "objective.metric=val_ppl_at_cost", "objective.max_honest_cost=0.95", "wandb=disabled",
        f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 2
    for r in results:  # the objective: the best validation PPL among the scan points within the cost budget
        within = [row["val_ppl"] for row in r["threshold_scan"] if row["val_honest_cost"] <= 0.95]
        assert r["objective_metric"] == "val_ppl_at_cost" and r["objective"] == min(within)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(r["objective"] for r in results)
    assert min(r["test_ppl"] for r in results) != best["best_value"]  # not the test PPL
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["status"] == "finished" for row in rows)
    assert len({row["hard_ratio.value"] for row in rows}) == 2
    assert (sweep / "report.html").stat().st_size > 10_000
