"""`train.log`, Hydra's job log, holds what the run printed: summary, stage lines, errors."""

import shutil
import sys

import pytest

from lego.pipeline.job_log import mirror_output
from tests.launch import run_train


def test_train_log_holds_the_stage_lines_and_the_summary(tiny_run):
    log = (tiny_run / "train.log").read_text()
    for line in ("stage 0: best val PPL", "stage 1: best val PPL", "test PPL", f"outputs: {tiny_run}"):
        assert f"\n{line}" in log, line
    assert "\r" not in log


def test_an_error_is_appended_to_the_log_of_the_run_it_refused(tiny_run, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = (run_dir / "train.log").read_text()
    proc = run_train("+experiment=tiny", f"hydra.run.dir={run_dir}", "model.dim=96", cache_dir=cache_dir)
    assert proc.returncode == 2
    log = (run_dir / "train.log").read_text()
    assert log.startswith(before)  # nothing already written is lost
    assert log.rstrip("\n").splitlines()[-1] == proc.stderr.strip().splitlines()[-1]
    assert "made with another config" in log.splitlines()[-1]


def test_progress_bars_leave_their_last_state_and_exceptions_their_traceback(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("earlier\n")
    streams = sys.stdout, sys.stderr
    with pytest.raises(ValueError, match="boom"), mirror_output(log):
        print("data: ready")
        for percent in (10, 60, 100):  # how tqdm redraws a bar
            sys.stderr.write(f"\rstage 0: {percent}%")
        sys.stderr.write("\n")
        sys.stderr.write("\rtest: 50%\r" + " " * 9 + "\r")  # a bar that erased itself (leave=False)
        print("no newline at the end", end="")
        raise ValueError("boom")
    lines = log.read_text().splitlines()
    assert lines[:4] == ["earlier", "data: ready", "stage 0: 100%", "no newline at the end"]
    assert lines[4] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"
    assert (sys.stdout, sys.stderr) == streams  # restored
