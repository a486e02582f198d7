"""Training throughput (`lego.training.throughput`): tokens/s and MFU against the device's bf16 peak, per stage in
stats.json, pooled per run in results.json, in W&B, the summary line and the report's config table."""

import json

import pytest
import torch

from lego.pipeline.summary import format_results
from lego.report import _config_table
from lego.report.collect import Run
from lego.report.tables import group_runs
from lego.training.throughput import device_peak_flops, peak_bf16_tflops, pooled, throughput
from tests.wandb_offline import read_offline_run


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla T4", None),
])  # fmt: skip
def test_known_devices_have_their_bf16_peak(name, peak):
    assert peak_bf16_tflops(name) == peak


def test_mfu_is_model_flops_per_second_over_every_ranks_peak(monkeypatch):
    assert throughput(1000, 5e12, 2.0, "cpu") == {"tokens_per_second": 500.0, "mfu": None}  # no peak on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_peak_flops("cuda") == 989e12
    got = throughput(1000, 989e12, 2.0, "cuda", ranks=2)
    assert got["tokens_per_second"] == 500.0 and got["mfu"] == pytest.approx(0.25)
    assert throughput(1000, 1.0, 0.0, "cuda") == {"tokens_per_second": None, "mfu": None}


def test_a_runs_throughput_pools_its_stages_over_their_seconds():
    stages = [
        {"train_seconds": 3.0, "tokens_per_second": 100.0, "mfu": 0.4},
        {"train_seconds": 1.0, "tokens_per_second": 500.0, "mfu": 0.2},
        {"train_seconds": 0.0, "tokens_per_second": None, "mfu": None},  # a Universal layer after the first
        {"best_val_ppl": 9.0},  # a stage trained by code from before throughput was recorded
    ]
    assert pooled(stages) == {"tokens_per_second": (300 + 500) / 4, "mfu": pytest.approx((1.2 + 0.2) / 4)}
    stages[1]["mfu"] = None  # one stage on a device without a known peak: no MFU for the run
    assert pooled(stages)["mfu"] is None and pooled([{}]) == {"tokens_per_second": None, "mfu": None}


def test_each_stage_records_its_throughput_and_the_run_pools_them(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    stages = [json.loads((tiny_run / f"stage_{k}" / "stats.json").read_text()) for k in (0, 1)]
    for stage, block in zip(stages, results["blocks"], strict=True):
        assert 0 < stage["train_seconds"] < stage["seconds"]  # the loop's time, without calibration and collection
        assert stage["tokens_per_second"] == pytest.approx(stage["train_tokens"] / stage["train_seconds"])
        assert stage["mfu"] is None and block["mfu"] is None  # the CPU has no bf16 peak
        assert block["tokens_per_second"] == stage["tokens_per_second"]
    tokens, seconds = sum(s["train_tokens"] for s in stages), sum(s["train_seconds"] for s in stages)
    assert results["train_tokens_per_second"] == pytest.approx(tokens / seconds) and results["train_mfu"] is None
    logged = read_offline_run(tiny_run)["summary"]
    assert logged["stage_1/tokens_per_second"] == stages[1]["tokens_per_second"]
    assert logged["train_tokens_per_second"] == results["train_tokens_per_second"]
    assert "stage_0/mfu" not in logged  # None is not logged
    assert "train tok/s" in (tiny_run / "report.html").read_text()
    shown = format_results(results).splitlines()
    assert f"training throughput {results['train_tokens_per_second']:,.0f} tokens/s, MFU - (no known peak)" in shown


def test_the_report_shows_throughput_and_mfu_where_a_run_has_it():
    def run(seed: int, rate: float, mfu: float | None) -> Run:
        results = {"train_tokens_per_second": rate, "train_mfu": mfu, "test_ppl": 10.0}
        return Run(".", f"gpu{seed}", {"experiment": "gpu"}, seed, "finished", results)

    table = _config_table(group_runs([run(0, 52000.0, 0.41), run(1, 54000.0, 0.43)]), ["gpu"])
    assert '<th class="">train tok/s</th>' in table and '<th class="">MFU</th>' in table
    assert "53,000" in table and "42.0%" in table
    cpu = _config_table(group_runs([run(0, 900.0, None)]), ["cpu"])
    assert "train tok/s" in cpu and "MFU" not in cpu  # no column of dashes for CPU runs
