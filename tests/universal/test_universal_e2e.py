"""`python train.py +experiment=universal_tiny` end to end: same outputs and results.json schema as LEGO."""

import json

import pytest

from tests.launch import run_train


@pytest.fixture(scope="module")
def universal_run(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    run_dir = tmp_path_factory.mktemp("universal") / "run"
    # W&B is the runner's, tested in tests/pipeline; disabled here it saves seconds per run.
    proc = run_train("+experiment=universal_tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, cache_dir


def test_results_have_lego_schema_and_universal_routing(universal_run):
    run_dir, _ = universal_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "universal"
    assert len(results["blocks"]) == 3 and all(block["layers"] == 1 for block in results["blocks"])
    assert results["thresholds"][0] == pytest.approx(0.95)  # the exit layer
    assert results["thresholds"][1] is None  # layer 2 never exits (inf, written as null)
    assert sum(results["exit_counts"]) == results["test_tokens"]
    assert 0.0 <= results["shallow_ratio"] <= 1.0 and 1 / 3 <= results["compute_cost"] <= 1.0
    first = results["blocks"][0]
    assert first["evals"] and {"step", "epoch", "train_loss", "val_ppl", "val_acc"} <= set(first["evals"][0])
    assert all(block["train_flops"] > 0 for block in results["blocks"])


def test_stage_folder_is_complete_and_a_rerun_loads_it(universal_run):
    run_dir, cache_dir = universal_run
    stage = run_dir / "stage_0"
    assert (stage / "model.safetensors").is_file() and (stage / "stats.json").is_file()
    assert not list(stage.glob("checkpoint*"))
    proc = run_train("+experiment=universal_tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training complete" in proc.stdout


def test_bad_universal_key_is_one_line_naming_it(universal_run, tmp_path):
    _, cache_dir = universal_run
    proc = run_train(
        "+experiment=universal_tiny", "+universal.layer_weights={1: -1}", "wandb=disabled",
        f"hydra.run.dir={tmp_path / 'bad'}", cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "universal.layer_weights" in proc.stderr and "Traceback" not in proc.stderr
