"""`python train.py +experiment=tiny` end to end, in a subprocess: outputs, stage isolation, resume,
multirun, W&B read-back."""

import json
import os
import subprocess

import torch
from safetensors.torch import load_file

from lego import TrainingData
from tests.launch import REPO, run_train
from tests.wandb_offline import read_offline_run

RESULT_KEYS = {
    "test_ppl", "test_acc", "val_ppl", "val_acc", "exit_counts", "exit_rates", "shallow_ratio",
    "compute_cost", "honest_cost", "thresholds", "blocks", "stage_seconds", "unigram_ppl", "threshold_scan",
}  # fmt: skip


def test_tiny_run_writes_every_output(tiny_run):
    assert (tiny_run / ".hydra" / "config.yaml").is_file()
    for k in (0, 1):
        assert (tiny_run / f"stage_{k}" / "model.safetensors").is_file()
        assert (tiny_run / f"stage_{k}" / "stats.json").is_file()
        assert not (tiny_run / f"stage_{k}" / "checkpoint.pt").exists()
    assert not (tiny_run / "stage_1" / "hard_tokens.safetensors").exists()  # the last block passes nothing on
    results = json.loads((tiny_run / "results.json").read_text())
    assert results.keys() >= RESULT_KEYS
    assert sum(results["exit_counts"]) == results["test_tokens"]
    assert 0.0 < results["shallow_ratio"] < 1.0
    assert results["test_ppl"] < results["unigram_ppl"]  # it learned something
    assert [b["block"] for b in results["blocks"]] == [0, 1]
    if (REPO / ".git").exists():  # which code ran (a copy without git history cannot say)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert results["code"]["commit"] == head and isinstance(results["code"]["dirty"], bool)
    else:
        assert results["code"] is None
    for name in ("exit_rates", "confidence_histograms", "ppl_vs_compute", "training_curves"):
        assert (tiny_run / "plots" / f"{name}.png").stat().st_size > 1000
    # a single run gets its report too (Hydra's callback): one row, status finished
    assert (tiny_run / "report.html").stat().st_size > 10_000
    summary = (tiny_run / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and ",finished," in summary[1]


def test_hard_tokens_are_the_exact_ratio_of_training_tokens(tiny_run):
    stats = json.loads((tiny_run / "stage_0" / "stats.json").read_text())
    hard = TrainingData.load(tiny_run / "stage_0" / "hard_tokens.safetensors")
    assert len(hard) == int(hard.targets.numel() * 0.5) == stats["hard_count"]
    assert hard.hidden_states.shape[-1] == 64


def test_training_compute_counts_the_hard_token_collection(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    stages = [json.loads((tiny_run / f"stage_{k}" / "stats.json").read_text()) for k in (0, 1)]
    # Block 0 scores every training token once (no head: the learned confidence), about a third of one
    # training epoch's 3x forward with the head; the last block collects nothing
    assert 0.1 * stages[0]["train_flops"] < stages[0]["collect_flops"] < 0.34 * stages[0]["train_flops"]
    assert stages[1]["collect_flops"] == 0.0
    total = sum(stage["train_flops"] + stage["collect_flops"] for stage in stages)
    assert results["train_flops"] == total


def test_stage_1_left_block_0_embedding_and_head_bit_identical(tiny_run):
    after_0 = load_file(str(tiny_run / "stage_0" / "model.safetensors"))
    final = load_file(str(tiny_run / "stage_1" / "model.safetensors"))
    shared = [k for k in after_0 if not k.startswith("blocks.1.")]
    assert any(k.startswith("blocks.0.") for k in shared) and "embedding.weight" in shared
    for key in shared:
        assert torch.equal(after_0[key], final[key]), key
    assert any(not torch.equal(after_0[k], final[k]) for k in after_0 if k.startswith("blocks.1."))


def test_wandb_offline_run_has_per_block_exit_stats(tiny_run):
    logged = read_offline_run(tiny_run)
    results = json.loads((tiny_run / "results.json").read_text())
    for k in (0, 1):
        assert logged["summary"][f"block_{k}/exit_rate"] == results["exit_rates"][k]
    assert logged["summary"]["test_ppl"] == results["test_ppl"]
    assert "exit_stats" in logged["tables"]
    assert logged["config"]["experiment_name"] == "tiny"
    assert any("stage_1/step" in row for row in logged["history"])


def test_rerun_skips_complete_stages(tiny_run, cache_dir):
    before = {k: (tiny_run / f"stage_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 1)}
    proc = run_train("+experiment=tiny", f"hydra.run.dir={tiny_run}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("complete in") == 2
    assert "plan:" not in proc.stdout  # nothing left to plan
    after = {k: (tiny_run / f"stage_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 1)}
    assert before == after


def test_resume_after_stage_0_trains_only_stage_1(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ("+experiment=tiny", f"hydra.run.dir={run_dir}", "wandb=disabled")
    assert run_train(*args, cache_dir=cache_dir).returncode == 0
    stage_0 = (run_dir / "stage_0" / "model.safetensors").read_bytes()
    final = (run_dir / "stage_1" / "model.safetensors").read_bytes()
    for path in (run_dir / "stage_1").iterdir():  # as if killed before stage 1 finished
        path.unlink()
    (run_dir / "results.json").unlink()
    proc = run_train(*args, "trainer.dump=delete", cache_dir=cache_dir)  # what a dump is kept as may change
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("complete in") == 1
    # the plan, printed before training: each stage's FLOPs at most what it then counts, the chosen hand-off
    planned = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert "hand-off trainer.dump=delete" in planned[1]
    flops = [float(part.split(" tokens ")[1].split()[0]) for part in planned[0].split(", Block ")]
    stats = json.loads((run_dir / "stage_1" / "stats.json").read_text())
    assert 0.5 * flops[1] < stats["train_flops"] <= flops[1]
    assert not list((run_dir / "stage_0").glob("hard_tokens*"))
    assert (run_dir / "stage_0" / "model.safetensors").read_bytes() == stage_0
    assert (run_dir / "stage_1" / "model.safetensors").read_bytes() == final  # deterministic retraining
    assert (run_dir / "results.json").is_file()


def test_resume_with_another_config_is_refused(tiny_run, cache_dir):
    record = {path.name: path.read_bytes() for path in (tiny_run / ".hydra").glob("*.yaml")}
    proc = run_train("+experiment=tiny", f"hydra.run.dir={tiny_run}", "model.dim=96", cache_dir=cache_dir)
    assert proc.returncode == 2
    assert "made with another config" in proc.stderr and "model.dim" in proc.stderr
    assert (tiny_run / "results.json").is_file()  # nothing already written is lost
    # Hydra rewrote its record of the run for the refused command; the record of the run that was made is back
    assert sorted(record) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert {name: (tiny_run / ".hydra" / name).read_bytes() for name in record} == record


def test_two_job_multirun_over_hard_ratio(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", "+experiment=tiny", "hard_ratio.value=0.3,0.7", f"hydra.sweep.dir={sweep}", cache_dir=cache_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").is_file())
    assert len(jobs) == 2
    hard_counts = [json.loads((job / "stage_0" / "stats.json").read_text())["hard_count"] for job in jobs]
    assert hard_counts[0] < hard_counts[1]
    groups = {read_offline_run(job)["group"] for job in jobs}
    assert groups == {f"tiny/{sweep.name}"}


def test_every_file_a_run_writes_has_the_permissions_of_the_umask(tiny_run):
    """A colleague on a shared server can read a run's results: no file LEGO writes is owner-only under the
    usual umask (W&B's own files under wandb/ are W&B's)."""
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    written = [p for p in tiny_run.rglob("*") if p.is_file() and "wandb" not in p.relative_to(tiny_run).parts]
    assert {"results.json", "report.html", "model.safetensors", "stats.json"} <= {p.name for p in written}
    wrong = [f"{p.relative_to(tiny_run)}: {p.stat().st_mode & 0o777:o}" for p in written
             if p.stat().st_mode & 0o777 != expected]  # fmt: skip
    assert not wrong, wrong
