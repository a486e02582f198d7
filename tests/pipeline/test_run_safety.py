"""A run never loses a user's files, never calls a diverged run a success, holds its directory alone, and turns
a full disk into one line (issue 18). Each test runs train.py in a subprocess, as a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, offline_env, run_train

TINY = ("+experiment=tiny", "wandb=disabled")


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    files = {"notes.txt": b"my notes\n", "data/corpus.txt": b"some text\n"}
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return files


@pytest.mark.parametrize(
    "override",
    ["hard_ratio.value=0", "data=text_files", "data=text_files data.files=[/nonexistent/corpus.txt]", None],
    ids=["bad-value", "no-files", "missing-file", "good-config"],
)
def test_a_folder_of_user_files_is_refused_and_left_as_it_was(tmp_path, cache_dir, override):
    run_dir = tmp_path / "papers"
    files = _user_folder(run_dir)
    proc = run_train(*TINY, *(override.split() if override else []), f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    line = _one_line_error(proc)
    assert "is not a LEGO run directory" in line and "notes.txt" in line
    for name, content in files.items():
        assert (run_dir / name).read_bytes() == content
    assert not (run_dir / "run_config.json").exists() and not list(run_dir.glob("stage_*"))


def test_bad_input_in_a_new_folder_removes_only_what_the_run_made(tmp_path, cache_dir):
    run_dir = tmp_path / "new"
    proc = run_train(*TINY, "data=text_files", f"data.files=[{tmp_path}/missing.txt]", f"hydra.run.dir={run_dir}",
                     cache_dir=cache_dir)  # fmt: skip
    _one_line_error(proc)
    assert not run_dir.exists()


@pytest.mark.parametrize("experiment, where", [("tiny", "stage 0"), ("universal_tiny", "universal training")])
def test_a_diverging_stage_stops_with_one_line_and_writes_no_results(tmp_path, cache_dir, experiment, where):
    run_dir = tmp_path / "run"
    proc = run_train(f"+experiment={experiment}", "wandb=disabled", "block_schedule.blocks.0.lr=10",
                     f"hydra.run.dir={run_dir}", cache_dir=cache_dir)  # fmt: skip
    line = _one_line_error(proc)
    assert f"{where} diverged" in line and "at step" in line and "block_schedule.blocks[0].lr (now 10)" in line
    assert not (run_dir / "results.json").exists() and not (run_dir / "stage_0" / "stats.json").exists()
    assert (run_dir / "train.log").is_file()  # a diverged run keeps its folder and log: the report says why


def test_a_sweep_records_a_diverged_job_as_failed_and_runs_the_others(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *TINY, "block_schedule.blocks.0.lr=10,1e-2", f"hydra.sweep.dir={sweep}",
                     cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (diverged,) = sweep.glob("0_*")
    (finished,) = sweep.glob("1_*")
    assert not (diverged / "results.json").exists()
    assert (finished / "results.json").is_file()  # the sweep went on after the failed job
    rows = (sweep / "summary.csv").read_text()
    assert "diverged: error: stage 0 diverged" in rows and "finished" in rows


def test_the_same_command_twice_on_one_folder_is_refused_while_the_first_runs(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    accepted = run_dir / ".hydra" / "accepted" / "config.yaml"  # Hydra's record of the holder's command
    accepted.parent.mkdir(parents=True)
    accepted.write_text("seed: 7\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lego.pipeline.run_dir import RunLock; import pathlib, time\n"
         f"with RunLock(pathlib.Path({str(run_dir)!r})):\n    print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_train(*TINY, f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
        line = _one_line_error(proc)
        assert "in use by another run" in line and f"pid {holder.pid}" in line
        assert (run_dir / ".lock").is_file()  # the holder's files are not cleaned up by the refused run
        assert (run_dir / ".hydra" / "config.yaml").read_text() == "seed: 7\n"  # nor its record left rewritten
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything by hand: its lock is stale and the next run takes it
    proc = run_train(*TINY, "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
                     f"hydra.run.dir={run_dir}", cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    stale = [run_dir / "stage_0" / ".hard_tokens.safetensors.4242.tmp", run_dir / "stage_0" / ".checkpoint.pt.x1.tmp"]
    proc = run_train(*TINY, "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
                     f"hydra.run.dir={run_dir}", cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    proc = run_train(*TINY, "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
                     f"hydra.run.dir={run_dir}", cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize(
    "content, message",
    [('["not", "a", "stage"]', "does not hold what LEGO wrote"), ('{"block": 0}', "best_val_ppl")],
)
def test_a_stats_file_of_the_wrong_shape_is_one_line(tiny_run, tmp_path, cache_dir, content, message):
    run_dir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(tiny_run), str(run_dir)], check=True)
    (run_dir / "stage_0" / "stats.json").write_text(content)
    line = _one_line_error(run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", cache_dir=cache_dir))
    assert message in line and "stats.json" in line


def test_a_pickled_checkpoint_is_refused_in_one_line(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_train(*TINY, "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
                     f"hydra.run.dir={run_dir}", cache_dir=cache_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in run_dir.glob("stage_1/*"):
        path.unlink()  # stage 1 incomplete again, with a checkpoint that would run code when unpickled
    subprocess.run(
        [sys.executable, "-c", "import torch, argparse, sys; torch.save({'weights': argparse.Namespace()}, "
         "sys.argv[1])", str(run_dir / "stage_1" / "checkpoint.pt")], check=True,
    )  # fmt: skip
    line = _one_line_error(run_train(*TINY, "block_schedule.blocks.0.max_steps=3",
                                     "block_schedule.blocks.1.max_steps=3", f"hydra.run.dir={run_dir}",
                                     cache_dir=cache_dir))  # fmt: skip
    assert "checkpoint.pt cannot be loaded as a plain-tensor checkpoint" in line and "delete it" in line


# Every stage validates (and so checkpoints) four times, so that a kill can land between two checkpoints.
KILL_RUN = ("+experiment=tiny", "data.max_train_tokens=30000",
            *(f"block_schedule.blocks.{k}.evals_per_epoch=4" for k in (0, 1)))  # fmt: skip


def _kill_when(run_dir: Path, ready, cache_dir: Path) -> int:
    """Start KILL_RUN in `run_dir` and SIGKILL it as soon as `ready(run_dir, log)` holds, where `log` is what this
    process added to train.log (every run appends to it); its return code."""
    log_path = run_dir / "train.log"
    start = log_path.stat().st_size if log_path.is_file() else 0
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "trainer.progress=false", *KILL_RUN, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=offline_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        log = log_path.read_bytes()[start:].decode(errors="replace") if log_path.is_file() else ""
        if ready(run_dir, log):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait()


KILL_POINTS = {  # what shows that the run is at each point
    "stage 0 before its first checkpoint": lambda run_dir, log: "model:" in log,
    "stage 0 after a checkpoint": lambda run_dir, log: (run_dir / "stage_0" / "checkpoint.pt").is_file(),
    "stage 1 after a checkpoint": lambda run_dir, log: (run_dir / "stage_1" / "checkpoint.pt").is_file(),
    "final evaluation": lambda run_dir, log: "final evaluation:" in log,
}


def test_kills_at_every_stage_resume_to_the_uninterrupted_test_ppl(tmp_path, cache_dir):
    reference = tmp_path / "uninterrupted"
    assert run_train(*KILL_RUN, f"hydra.run.dir={reference}", cache_dir=cache_dir).returncode == 0
    run_dir = tmp_path / "killed"
    codes = {name: _kill_when(run_dir, ready, cache_dir) for name, ready in KILL_POINTS.items()}
    killed_at = [name for name, code in codes.items() if code == -signal.SIGKILL]
    assert len(killed_at) >= 3, killed_at  # a point can pass between two polls on a busy machine; most are hit
    proc = run_train(*KILL_RUN, f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, uninterrupted = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert resumed["test_ppl"] == uninterrupted["test_ppl"]
    assert resumed["exit_counts"] == uninterrupted["exit_counts"]
    assert not list(run_dir.rglob(".*.tmp"))
