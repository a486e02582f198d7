"""MoE end to end through train.py: `+experiment=tiny_moe` (experts in Block 1 only) and Universal with experts,
read back from results.json, stats.json, the plots, W&B's offline files and the run's report."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.launch import run_train
from tests.wandb_offline import read_offline_run


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("moe") / "run"
    proc = run_train("+experiment=tiny_moe", f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_tiny_moe_reports_the_routing_of_its_expert_layers(moe_run):
    results = json.loads((moe_run / "results.json").read_text())
    (layer,) = results["moe"]  # layers: later_blocks: Block 1's one layer, Block 0 stays dense
    assert layer["layer"] == "block1.layer0" and len(layer["load"]) == 8
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert layer["tokens"] == results["blocks"][1]["reached"]  # Block 1 routes only the tokens reaching it
    assert 1.0 <= layer["imbalance"] < 8 and 0 < layer["entropy"] <= layer["max_entropy"] and layer["dropped"] == 0
    stage_0 = json.loads((moe_run / "stage_0" / "stats.json").read_text())
    stage_1 = json.loads((moe_run / "stage_1" / "stats.json").read_text())
    assert stage_0["moe"] == []
    assert stage_1["moe"][0]["tokens"] == stage_1["train_tokens"]  # every training step's hard tokens routed
    assert results["test_ppl"] < results["unigram_ppl"]


def test_expert_load_heatmap_is_drawn(moe_run):
    pixels = np.asarray(Image.open(moe_run / "plots" / "expert_load.png").convert("L"), dtype=float)
    assert pixels.shape[1] > 600 and pixels.std() > 20  # a real picture, not a blank canvas


def test_wandb_holds_the_expert_load(moe_run):
    logged = read_offline_run(moe_run)
    results = json.loads((moe_run / "results.json").read_text())
    assert logged["summary"]["moe/block1.layer0/imbalance"] == pytest.approx(results["moe"][0]["imbalance"])
    assert "moe_expert_load" in logged["tables"]
    assert any("plots/expert_load" in name for name in logged["images"])
    assert any("stage_1/moe_imbalance" in row for row in logged["history"])
    assert not any("stage_0/moe_imbalance" in row for row in logged["history"])


def test_run_report_shows_the_expert_load(moe_run):
    page = (moe_run / "report.html").read_text()
    assert "MoE expert load" in page and "MoE max/mean load" in page
    header = (moe_run / "summary.csv").read_text().splitlines()[0]
    assert "moe_imbalance_block1.layer0" in header


def test_universal_with_experts_trains_and_balances(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=universal_tiny", "moe=e8_top2_bias", f"hydra.run.dir={run_dir}", "wandb=disabled",
                     cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    layers = ["block0.layer0", "block1.layer0", "block2.layer0"]
    assert [row["layer"] for row in results["moe"]] == layers  # the test pass
    trained = json.loads((run_dir / "stage_0" / "stats.json").read_text())["moe"]  # the training steps
    assert [row["layer"] for row in trained] == layers
    assert all(row["tokens"] > results["moe"][0]["tokens"] and row["imbalance"] >= 1 for row in trained)
    weights = load_file(str(run_dir / "stage_0" / "model.safetensors"))
    biases = [weights[f"blocks.{k}.layers.0.ffn.expert_bias"] for k in range(3)]
    assert all(bias.abs().sum() > 0 for bias in biases)  # every layer's bias took balancing steps
