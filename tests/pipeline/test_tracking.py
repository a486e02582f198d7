"""W&B tracking in offline mode: what a run logs can be read back from its run folder, with no account or network."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
import wandb

from lego.errors import ConfigError, DataError
from lego.pipeline import tracking
from lego.pipeline.plots import plot_exit_rates
from lego.pipeline.tracking import Tracker
from tests.launch import REPO, run_train
from tests.wandb_offline import log_run_id, read_offline_run, records

CONFIG = {"experiment_name": "tiny", "model": {"dim": 32, "blocks": [2, 2]}, "hard_ratio": {"value": 0.5}}


def two_block_results() -> dict:
    """The results.json keys the tracker reads; block 0 got no exits, so its PPL and accuracy are NaN."""
    blocks = [
        {"block": 0, "layers": 2, "threshold": 0.99, "exit_count": 0, "exit_rate": 0.0, "mean_confidence": 0.41},
        {"block": 1, "layers": 2, "threshold": None, "exit_count": 500, "exit_rate": 1.0, "mean_confidence": 0.2},
    ]
    blocks[0].update(ppl=math.nan, acc=math.nan, evals=[{"step": 3, "val_ppl": 80.0}])
    blocks[1].update(ppl=41.5, acc=0.22, evals=[{"step": 3, "val_ppl": 60.0}])
    return {
        "experiment_name": "tiny",
        "test_ppl": 41.5,
        "test_acc": 0.22,
        "val_ppl": 43.0,
        "val_acc": 0.21,
        "compute_cost": 1.0,
        "honest_cost": 1.0,
        "shallow_ratio": 0.0,
        "unigram_ppl": 120.0,
        "exit_counts": [0, 500],
        "exit_rates": [0.0, 1.0],
        "blocks": blocks,
        "threshold_scan": [{"target_exit_share": 0.0, "test_ppl": 41.5, "honest_cost": 1.0}],
        "ltt": {"risk": "disagreement", "epsilon": 0.05, "delta": 0.1, "exit_share": 0.3, "certified": True,
                "test_risk": 0.04, "tested": [{"exit_share": 0.3, "risk": 0.03}]},
    }


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One offline run with two stages and final results, shared by the read-back tests (wandb takes ~1 s)."""
    run_dir = tmp_path_factory.mktemp("run")
    results = two_block_results()
    image = plot_exit_rates(results, run_dir / "plots" / "exit_rates.png")
    with Tracker(run_dir=run_dir, config=CONFIG, group="sweep", name="job-0", tags=["test"]) as tracker:
        for stage in (0, 1):
            for step in (1, 2, 3):
                tracker.log_step(stage, {"lm_loss": 5.0 - step - stage, "tokens": 64.0})
            stats = {"hard_count": 120 - 120 * stage, "threshold": 0.99 if stage == 0 else None, "best_val_ppl": 60.0}
            tracker.log_stage_end(stage, {**stats, "seconds": 1.5, "train_tokens": 192, "evals": [{"step": 3}]})
        tracker.log_final(results, {"exit_rates": image, "missing": run_dir / "plots" / "missing.png"})
    return tracker, results, read_offline_run(run_dir)


def test_per_block_exit_stats_are_summary_values(offline_run):
    _, results, logged = offline_run
    summary = logged["summary"]
    for k, block in enumerate(results["blocks"]):
        for field in ("exit_rate", "exit_count", "mean_confidence", "layers"):
            assert summary[f"block_{k}/{field}"] == block[field]
    assert summary["block_0/threshold"] == 0.99
    assert "block_1/threshold" not in summary  # the last block has none
    assert summary["block_1/ppl"] == 41.5 and summary["block_1/acc"] == 0.22
    assert summary["block_0/ppl"] is None or math.isnan(summary["block_0/ppl"])  # NaN logged as-is


def test_run_scalars_and_stage_ends_are_summary_values(offline_run):
    _, results, logged = offline_run
    summary = logged["summary"]
    for key in ("test_ppl", "val_ppl", "compute_cost", "honest_cost", "unigram_ppl"):
        assert summary[key] == results[key]
    assert summary["stage_0/hard_count"] == 120 and summary["stage_0/threshold"] == 0.99
    assert summary["stage_1/hard_count"] == 0 and summary["stage_1/train_tokens"] == 192
    assert "stage_1/threshold" not in summary and "stage_0/evals" not in summary
    ltt = results["ltt"]  # the promised risk beside the measured one, in the runs table
    assert summary["ltt/epsilon"] == ltt["epsilon"] and summary["ltt/test_risk"] == ltt["test_risk"]
    assert summary["ltt/risk"] == "disagreement" and summary["ltt/certified"] is True and "ltt/tested" not in summary


def test_config_group_and_run_identity(offline_run):
    _, _, logged = offline_run
    assert logged["config"] == CONFIG
    assert (logged["group"], logged["name"], logged["tags"], logged["job_type"]) == (
        "sweep",
        "job-0",
        ["test"],
        "train",
    )
    assert logged["exit_code"] == 0


def test_training_curves_use_each_stages_own_step(offline_run):
    _, _, logged = offline_run
    for stage in (0, 1):
        rows = [row for row in logged["history"] if f"stage_{stage}/step" in row]
        assert [row[f"stage_{stage}/step"] for row in rows] == [1, 2, 3]
        assert [row[f"stage_{stage}/lm_loss"] for row in rows] == [4.0 - stage, 3.0 - stage, 2.0 - stage]


def test_table_and_images_are_logged(offline_run):
    _, _, logged = offline_run
    assert logged["tables"] == ["exit_stats"]
    assert logged["images"] == ["plots/exit_rates"]  # the missing file is skipped
    assert logged["summary"]["exit_stats"]["nrows"] == 2


def test_offline_run_folder_is_self_contained(offline_run):
    """`wandb sync` uploads the table from its staged copy, which must therefore live in the run folder too."""
    tracker, _, _ = offline_run
    log = next(tracker.offline_dir.glob("run-*.wandb"))
    artifacts = [r.artifact for r in records(log) if r.WhichOneof("record_type") == "artifact"]
    staged = [entry.local_path for artifact in artifacts for entry in artifact.manifest.contents]
    assert staged and all(path.startswith(str(tracker.offline_dir)) for path in staged)
    assert "WANDB_DATA_DIR" not in os.environ  # restored after logging the table


def test_exception_finishes_the_run_and_the_next_job_gets_its_own(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), Tracker(run_dir=tmp_path / "job0", config={"job": 0}) as failed:
        failed.log_step(0, {"lm_loss": 1.0})
        raise RuntimeError("boom")
    with Tracker(run_dir=tmp_path / "job1", config={"job": 1}) as second:
        second.log_step(0, {"lm_loss": 2.0})
    first_logged, second_logged = read_offline_run(failed.offline_dir), read_offline_run(second.offline_dir)
    assert first_logged["exit_code"] == 1 and second_logged["exit_code"] == 0
    assert second_logged["config"] == {"job": 1}
    assert [row["stage_0/lm_loss"] for row in second_logged["history"]] == [2.0]
    assert _run_id(tmp_path / "job0") != _run_id(tmp_path / "job1")
    second.finish()  # idempotent


# A job killed in stage 1: stage 0 finished, stage 1 logged steps 1-4 and a validation at step 2 (its checkpoint).
# With "written", it waits until wandb has written all 8 rows to its folder before the kill.
KILLED_JOB = """
import os, signal, sys, time
from lego.pipeline.tracking import Tracker
from tests.wandb_offline import read_offline_run
tracker = Tracker(run_dir=sys.argv[1], config={"job": 0})
for step in (1, 2, 3):
    tracker.log_step(0, {"step": step, "lm_loss": 5.0 - step})
tracker.log_stage_end(0, {"hard_count": 120})
for step in (1, 2, 3, 4):
    tracker.log_step(1, {"step": step, "lm_loss": 4.0 - step})
    if step == 2:
        tracker.log_step(1, {"step": step, "val_ppl": 30.5})
deadline = time.monotonic() + 60
while sys.argv[2] == "written" and time.monotonic() < deadline:
    if len(read_offline_run(sys.argv[1], finished=False)["history"]) == 8:
        break
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
"""
KILLED_ROWS = 8


def _kill_a_job(run_dir, wait: str) -> None:
    """Run KILLED_JOB in a process of its own, with its own wandb service (as a separate `python train.py`
    has, not the one this process's runs left in the env). To wait until wandb has written the rows, it makes
    wandb write every 0.05 s instead of 15 s (a private wandb setting, for this test only)."""
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    env["WANDB_SILENT"] = "true"
    if wait == "written":
        env["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = "0.05"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_JOB, str(run_dir), wait], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def _resume_stage_1(run_dir, results: dict, image) -> Tracker:
    """The resumed job: stage 1 restarts from its checkpoint (step 2), trains steps 3-5, then the final results."""
    with Tracker(run_dir=run_dir, config={"job": 0}) as resumed:
        for step in (3, 4, 5):
            resumed.log_step(1, {"step": step, "lm_loss": 4.0 - step})
        resumed.log_step(1, {"step": 5, "val_ppl": 28.5})
        resumed.log_stage_end(1, {"hard_count": 0})
        resumed.log_final(results, {"exit_rates": image})
    return resumed


def _run_id(run_dir):
    return (run_dir / "wandb" / tracking.RUN_ID_FILE).read_text().strip()


def _placed(history: list[dict]) -> list[tuple]:
    """Every logged value with where it sits: (stage step key, step, key), or (None, None, key) outside the stages."""
    placed = []
    for row in history:
        axis = next((key for key in row if key.endswith("/step")), None)
        placed += [(axis, row.get(axis), key) for key in row if key != axis and not key.startswith("_")]
    return placed


def test_a_resumed_run_continues_its_wandb_run_without_duplicates(tmp_path):
    """Kill (after wandb wrote the rows), resume, re-run: one W&B run id for the run directory, every value
    logged exactly once, steps in order."""
    _kill_a_job(tmp_path, "written")
    first = read_offline_run(tmp_path, finished=False)
    assert first["exit_code"] is None and len(first["history"]) == KILLED_ROWS  # the killed process never finished
    results = two_block_results()
    image = plot_exit_rates(results, tmp_path / "plots" / "exit_rates.png")
    _resume_stage_1(tmp_path, results, image)
    with Tracker(run_dir=tmp_path, config={"job": 0}) as again:  # re-running the finished directory
        again.log_final(results, {"exit_rates": image})

    run_id = _run_id(tmp_path)
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and all(f"-{run_id}" in folder.name for folder in folders)
    logged = read_offline_run(tmp_path)
    assert (logged["folders"], logged["exit_code"], logged["config"]) == (3, 0, {"job": 0})
    history = logged["history"]
    assert [row["_step"] for row in history] == list(range(len(history)))  # one step axis across the folders
    placed = _placed(history)
    assert len(placed) == len(set(placed))  # nothing logged twice
    assert [step for axis, step, key in placed if key == "stage_1/lm_loss"] == [1, 2, 3, 4, 5]
    assert [step for axis, step, key in placed if key == "stage_1/val_ppl"] == [2, 5]
    assert [step for axis, step, key in placed if key == "stage_0/lm_loss"] == [1, 2, 3]
    assert sorted(key for axis, step, key in placed if axis is None) == ["exit_stats", "plots/exit_rates"]  # one row
    assert logged["summary"]["stage_0/hard_count"] == 120 and logged["summary"]["test_ppl"] == results["test_ppl"]


def test_a_resumed_training_run_adds_only_what_is_new(tiny_run, cache_dir, tmp_path):
    """`python train.py` resumed after a kill in stage 1 (its folder emptied) logs into the same W&B run; the
    retrained stage's rows and the final plots, which the first process already logged, are not logged again."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = read_offline_run(run_dir)
    for path in (run_dir / "stage_1").iterdir():
        path.unlink()
    (run_dir / "results.json").unlink()
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("complete in") == 1  # stage 0 loaded, stage 1 retrained
    after = read_offline_run(run_dir)
    assert after["folders"] == before["folders"] + 1 and after["exit_code"] == 0
    assert {log_run_id(log) for log in (run_dir / "wandb").glob("*run-*/*.wandb")} == {_run_id(run_dir)}
    assert Counter(_placed(after["history"])) == Counter(_placed(before["history"]))  # nothing new, nothing twice
    assert after["summary"]["test_ppl"] == json.loads((run_dir / "results.json").read_text())["test_ppl"]


def test_a_kill_before_wandb_wrote_the_rows_loses_them_and_logs_nothing_twice(tmp_path):
    """Killed right after logging, the folder holds few of the rows or none (wandb 0.31 writes every 15 s); the
    resume logs only the steps after the record's (stage 1 step 5 and the final media), numbered after the killed
    process's rows, so whatever the killed folder holds, nothing is in the history twice."""
    _kill_a_job(tmp_path, "now")
    results = two_block_results()
    resumed = _resume_stage_1(tmp_path, results, plot_exit_rates(results, tmp_path / "plots" / "exit_rates.png"))
    new = read_offline_run(resumed.offline_dir)["history"]
    assert [row["_step"] for row in new] == list(range(KILLED_ROWS, KILLED_ROWS + len(new)))
    assert sorted(key for _, step, key in _placed(new) if step == 5) == ["stage_1/lm_loss", "stage_1/val_ppl"]
    assert {key for axis, _, key in _placed(new) if axis is None} == {"exit_stats", "plots/exit_rates"}
    assert len(_placed(new)) == 4
    placed = _placed(read_offline_run(tmp_path)["history"])
    assert len(placed) == len(set(placed))


def test_a_new_run_id_starts_a_new_record(tmp_path):
    """Deleting wandb/run_id logs to a new W&B run (README): that run logs everything, whatever the old one holds."""
    with Tracker(run_dir=tmp_path, config={}) as first:
        first.log_step(0, {"step": 1, "lm_loss": 2.0})
    (tmp_path / "wandb" / tracking.RUN_ID_FILE).unlink()
    with Tracker(run_dir=tmp_path, config={}) as second:
        second.log_step(0, {"step": 1, "lm_loss": 2.0})
    assert read_offline_run(second.offline_dir)["history"][0]["stage_0/lm_loss"] == 2.0
    assert log_run_id(next(first.offline_dir.glob("*.wandb"))) != _run_id(tmp_path)


def test_a_run_directory_logged_without_a_record_resumes_into_a_new_wandb_run(tmp_path, capsys):
    """A run directory from before the record: which rows its W&B run holds is unknown, so a resume logging into
    it could repeat steps; it gets a new run instead, and says so."""
    with Tracker(run_dir=tmp_path, config={}) as first:
        first.log_step(0, {"step": 1, "lm_loss": 2.0})
    old_id = _run_id(tmp_path)
    (tmp_path / "wandb" / tracking.LOGGED_FILE.format(run_id=old_id)).unlink()
    with Tracker(run_dir=tmp_path, config={}) as second:
        second.log_step(0, {"step": 1, "lm_loss": 2.0})
    assert _run_id(tmp_path) != old_id and "logging this resume as a new W&B run" in capsys.readouterr().out
    assert read_offline_run(second.offline_dir)["history"][0]["stage_0/lm_loss"] == 2.0


def test_lego_uses_no_private_wandb_api():
    """wandb's private modules, attributes and settings (`x_*`), and the transaction-log format they hold, may
    change with any wandb release, so lego/ uses none of them (tests/wandb_offline.py reads the logs, for tests)."""
    private_settings = sorted(name for name in wandb.Settings.model_fields if name.startswith("x_"))
    assert "x_transaction_log_flush_interval" in private_settings  # the list is read from wandb itself
    private = re.compile(
        r"wandb\.(proto|sdk|apis\.internal)|wandb_internal_pb2|WANDB__"  # modules, private env settings
        r"|\bwandb\._\w|\brun\._\w"  # private attributes of wandb and of its run
        rf"|\b({'|'.join(private_settings)})\b"
    )
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "lego").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "\n".join(found)


def test_a_run_id_file_that_is_not_an_id_is_refused(tmp_path):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / tracking.RUN_ID_FILE).write_text("not an id!")
    with pytest.raises(DataError, match=r"wandb/run_id holds 'not an id!', not a W&B run id; delete the file"):
        Tracker(run_dir=tmp_path, config={})


def test_disabled_writes_nothing(tmp_path):
    with Tracker(run_dir=tmp_path, config=CONFIG, mode="disabled") as tracker:
        tracker.log_step(0, {"lm_loss": 1.0})
        tracker.log_stage_end(0, {"hard_count": 1})
        tracker.log_final(two_block_results(), {})
    assert tracker.offline_dir is None
    assert not (tmp_path / "wandb").exists()


def test_bad_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="wandb.mode='sometimes' must be one of offline, online, disabled"):
        Tracker(run_dir=tmp_path, config={}, mode="sometimes")


def test_online_failure_suggests_offline(tmp_path, monkeypatch):
    def no_network(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\nmore detail")

    monkeypatch.setattr(wandb, "init", no_network)
    with pytest.raises(ConfigError, match=r"^wandb.mode=online .*\(Network error .*\).*wandb.mode=offline$"):
        Tracker(run_dir=tmp_path, config={}, mode="online")
