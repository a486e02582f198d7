"""A small corpus's symptoms are each one line: warm-up longer than a stage, splits too small to measure, a stage
that stopped early, a test PPL above the unigram baseline; and a sweep deletes the stage dumps no resume needs."""

import json
import re

import pytest

from experiments import eval_noise
from lego.pipeline.checks import MIN_EVAL_TOKENS
from tests.launch import run_train

DUMP_LINE = "trainer.dump=delete, the default in a sweep"


@pytest.fixture(scope="module")
def starved(tmp_path_factory, cache_dir):
    """Four training steps under a 50-step warm-up, 1,000 validation and test tokens: nearly untrained."""
    run_dir = tmp_path_factory.mktemp("starved") / "run"
    proc = run_train(
        "+experiment=tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", "data.max_train_tokens=2000",
        "data.max_eval_tokens=1000", "block_schedule.blocks.0.warmup_steps=50", cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, (run_dir / "train.log").read_text().splitlines()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> tuple:
    """Two jobs, dumps left to the sweep default and kept on request, Block 0 overfitting 32 sequences over 40
    epochs (early stopping ends it), validation and test splits capped where the starved run's warning says to."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sweep"
    proc = run_train(
        "-m", "+experiment=tiny", "trainer.dump=auto,keep", f"hydra.sweep.dir={sweep_dir}", "wandb=disabled",
        "data.max_train_tokens=1056", f"data.max_eval_tokens={MIN_EVAL_TOKENS}", "block_schedule.blocks.0.epochs=40",
        "block_schedule.blocks.0.warmup_steps=1", "block_schedule.blocks.1.warmup_steps=1", cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, sweep_dir


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: ")]


def test_splits_below_the_bound_are_named_before_training(starved):
    proc, log = starved
    split_warnings = [line for line in warnings_in(proc.stderr) if " split has " in line]
    assert len(split_warnings) == 2, proc.stderr
    for name, line in zip(("validation", "test"), split_warnings, strict=True):
        tokens = int(re.search(rf"the {name} split has ([\d,]+) tokens", line)[1].replace(",", ""))
        assert tokens < MIN_EVAL_TOKENS and f"fewer than {MIN_EVAL_TOKENS:,}" in line
        assert f"set data.max_eval_tokens={MIN_EVAL_TOKENS} or more (now 1000)" in line
    assert log.index(split_warnings[0]) < _first(log, "stage 0:")


def test_a_warmup_longer_than_the_stage_is_named_before_it_trains(starved):
    proc, log = starved
    (line,) = [line for line in warnings_in(proc.stderr) if line.startswith("warning: stage 0 ")]
    steps = int(re.search(r"stage 0 trains (\d+) steps? but warms up over 50 ", line)[1])
    assert steps < 50 and "block_schedule.blocks[0].warmup_steps" in line
    assert log.index(line) < _first(log, "stage 0:")


def test_a_test_ppl_above_the_unigram_baseline_is_a_summary_line(starved):
    proc, _ = starved
    (line,) = [line for line in warnings_in(proc.stdout) if "unigram baseline" in line]
    test_ppl, unigram = (
        float(x) for x in re.search(r"test PPL ([\d.]+) is above the unigram baseline ([\d.]+)", line).groups()
    )
    assert test_ppl > unigram
    assert proc.stdout.index("test PPL") < proc.stdout.index(line)  # right under the numbers it is about


def test_a_sound_single_run_warns_only_about_its_small_splits_and_keeps_its_dumps(tiny_run):
    """tiny validates and tests on 4,000 tokens each: those warnings are due, not the others; and a single run
    keeps its dumps."""
    log = (tiny_run / "train.log").read_text()
    # the split warnings follow each command's baseline line; other tests' commands on this folder append theirs
    first_command = log.split("baseline: unigram")[1]
    assert [line.split(" split has ")[0] for line in warnings_in(first_command) if " split has " in line] == [
        "warning: the validation", "warning: the test"
    ]  # fmt: skip
    assert not [line for line in warnings_in(log) if " warms up over " in line or "unigram baseline" in line]
    assert "stopped early" not in log and DUMP_LINE not in log
    assert (tiny_run / "stage_0" / "hard_tokens.safetensors").is_file()


def test_a_sweep_deletes_the_dumps_unless_told_to_keep_them(sweep):
    proc, sweep_dir = sweep
    auto, keep = sorted(path for path in sweep_dir.iterdir() if (path / "results.json").is_file())
    assert "trainer.dump=auto" in auto.name and "trainer.dump=keep" in keep.name
    assert not list(auto.glob("stage_*/hard_tokens*"))
    assert (keep / "stage_0" / "hard_tokens.safetensors").is_file()
    assert proc.stdout.count(DUMP_LINE) == 1 and "trainer.dump=keep keeps them" in proc.stdout


def test_a_stage_that_stopped_early_says_so(sweep):
    proc, _ = sweep
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage 0:")]
    assert len(lines) == 2
    for line in lines:
        steps, planned = (
            int(x) for x in re.search(r"stopped early after (\d+) of (\d+) steps \(patience 2\)", line).groups()
        )
        assert steps < planned == 80  # 40 epochs of 2 steps
    assert not any("stopped early" in line for line in proc.stdout.splitlines() if line.startswith("stage 1:"))


def test_splits_of_the_bound_and_warmups_within_the_stage_give_no_warning(sweep):
    proc, _ = sweep
    assert not [line for line in warnings_in(proc.stderr) if " split has " in line or " warms up over " in line]


def test_universal_training_names_a_warmup_longer_than_its_steps(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=universal_tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", "data.max_train_tokens=2000",
        "block_schedule.blocks.0.warmup_steps=50", cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in warnings_in(proc.stderr) if " warms up over " in line]
    assert re.match(
        r"warning: universal training trains \d+ steps? but warms up over 50 \(block_schedule.blocks\[0\]", line
    )
    log = (run_dir / "train.log").read_text().splitlines()
    assert log.index(line) < _first(log, "universal: ")  # before it trains


def test_eval_noise_scores_the_runs_own_test_ppl_and_its_error_shrinks_with_the_tokens(
    tiny_run, cache_dir, monkeypatch
):
    """experiments/eval_noise.py, whose figures document MIN_EVAL_TOKENS, measures the run's model as results.json
    does."""
    monkeypatch.setenv("LEGO_CACHE_DIR", str(cache_dir))
    result = eval_noise.main([str(tiny_run), "--tokens", "500", "5000"])
    assert result["test_ppl"] == pytest.approx(json.loads((tiny_run / "results.json").read_text())["test_ppl"])
    small, large = result["rows"]
    assert result["loss_sd"] > 0 and small["resampled"] > large["resampled"] > 0


def _first(lines: list[str], prefix: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(prefix))
