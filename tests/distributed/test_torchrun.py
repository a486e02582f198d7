"""`torchrun --nproc_per_node=2 train.py +experiment=tiny` on the CPU (gloo), against a one-process run,
plus its resume on one rank and a submitit-local sweep."""

import json
import shutil
from pathlib import Path

import pytest

from lego import TrainingData
from tests.launch import run_train

from .conftest import run_torchrun


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    """A 2-rank tiny run whose hydra.run.dir differs per process (microseconds): the ranks must agree."""
    runs = tmp_path_factory.mktemp("torchrun") / "runs"
    proc = run_torchrun("+experiment=tiny", f"hydra.run.dir={runs}/${{now:%H-%M-%S-%f}}", nproc=2, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = list(runs.iterdir())
    assert len(dirs) == 1, dirs  # one run directory for both ranks
    return dirs[0], proc.stdout


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_two_ranks_select_the_global_hard_ratio(two_rank_run, one_rank_run):
    run_dir, _ = two_rank_run
    stats = json.loads((run_dir / "stage_0" / "stats.json").read_text())
    single = json.loads((one_rank_run / "stage_0" / "stats.json").read_text())
    shards = [TrainingData.load(run_dir / "stage_0" / f"hard_tokens.rank{r}-of2.safetensors") for r in range(2)]
    assert not (run_dir / "stage_0" / "hard_tokens.safetensors").exists()
    assert stats["ranks"] == 2
    assert stats["active_tokens"] == single["active_tokens"]  # every training token, split over the ranks
    assert sum(len(s) for s in shards) == stats["hard_count"] == single["hard_count"]
    assert stats["hard_count"] == int(stats["active_tokens"] * 0.5)  # the global ratio, exactly
    assert [s.num_sequences for s in shards] == [1515, 1515]
    assert stats["train_sequences"] == single["train_sequences"]
    assert stats["calibration"]["val_tokens"] == single["calibration"]["val_tokens"]


def test_two_ranks_write_results_once(two_rank_run):
    run_dir, stdout = two_rank_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_ppl"] < results["unigram_ppl"]  # it learned something
    assert stdout.count("baseline: unigram") == stdout.count("with early exit") == 1  # rank 1 prints nothing
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run, from rank 0
    assert not (run_dir / "stage_1" / "checkpoint.pt").exists()


def test_fsdp_run_computes_what_the_replicated_run_computes(two_rank_run, tmp_path, cache_dir):
    run_dir = tmp_path / "fsdp"
    proc = run_torchrun(
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "trainer.fsdp=true",
        "wandb=disabled",
        "block_schedule.blocks.0.epochs=3",
        nproc=2,
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((run_dir / "results.json").read_text())
    # Step for step the sharded stage is the replicated one (tests/distributed/test_fsdp.py). Over a whole
    # run, rounding of other summation orders drifts: one epoch of the tiny run at lr 1e-2 sits on a
    # unigram plateau for a chaotic number of steps (seen: 130 of 190, or all of them), so this run gets
    # three epochs for Block 0 and is checked to have learned.
    assert sharded["test_ppl"] < 0.6 * sharded["unigram_ppl"]  # unigram 21, this run ~9
    for k in range(2):
        a, b = (json.loads((d / f"stage_{k}" / "stats.json").read_text()) for d in (run_dir, two_rank_run[0]))
        assert a["hard_count"] == b["hard_count"] and a["active_tokens"] == b["active_tokens"]


def test_two_rank_run_resumes_on_one_rank(two_rank_run, tmp_path, cache_dir):
    source, _ = two_rank_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("wandb"))
    shutil.rmtree(run_dir / "stage_1")
    (run_dir / "results.json").unlink()
    proc = run_train(
        "+experiment=tiny",
        f"hydra.run.dir={run_dir}",
        "wandb=disabled",
        "trainer.memory_budget_mb=0",
        cache_dir=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("complete in") == 1
    assert (run_dir / "stage_0" / "hard_tokens.safetensors").is_file()  # over budget: re-sharded to its own file
    assert (run_dir / "stage_0" / "val_routed.safetensors").is_file()  # and the routed validation set streamed
    stage_0 = json.loads((run_dir / "stage_0" / "stats.json").read_text())
    stage_1 = json.loads((run_dir / "stage_1" / "stats.json").read_text())
    assert stage_1["ranks"] == 1
    assert stage_1["active_tokens"] == stage_0["hard_count"]  # both shards, read back on one rank
    assert stage_1["train_sequences"] == stage_0["train_sequences"]
    assert (run_dir / "results.json").is_file()


def test_submitit_local_sweep_of_two_jobs(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", "hydra/launcher=submitit_local", "+experiment=tiny", "hard_ratio.value=0.3,0.7", "wandb=disabled",
        "data.max_train_tokens=20000", "trainer.num_threads=1", f"hydra.sweep.dir={sweep}", cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 2
    counts = [json.loads((job / "stage_0" / "stats.json").read_text())["hard_count"] for job in jobs]
    assert counts[0] < counts[1]


def test_slurm_launcher_config_composes(cache_dir):
    proc = run_train("--cfg=hydra", "--package=hydra.launcher", "hydra/launcher=slurm", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SlurmLauncher" in proc.stdout and "gpus_per_node: 1" in proc.stdout


def test_two_rank_moe_run_routes_every_ranks_tokens(tmp_path, cache_dir):
    """`+experiment=tiny_moe` on 2 ranks: it trains (experts a rank did not route to still join the gradient
    sum, tests/distributed/test_moe_ranks.py), and the stage's routing tally counts both ranks' tokens."""
    run_dir = tmp_path / "run"
    proc = run_torchrun("+experiment=tiny_moe", f"hydra.run.dir={run_dir}", "wandb=disabled", nproc=2,
                        cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((run_dir / "stage_1" / "stats.json").read_text())
    assert stats["ranks"] == 2
    assert stats["moe"][0]["tokens"] == stats["train_tokens"]  # summed over the ranks
    results = json.loads((run_dir / "results.json").read_text())
    assert results["moe"][0]["tokens"] == results["blocks"][1]["reached"]
    assert results["test_ppl"] < results["unigram_ppl"]
