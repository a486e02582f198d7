"""The whole pipeline in a memory cgroup smaller than its corpus's int64 token stream (issue "a billion tokens on one
machine"): preparation streams the text into token files, training maps them, the hand-off is a 1-byte mask
(`trainer.dump=stream`), and the run finishes.

The limit is the run's fixed cost (the interpreter, torch, Hydra; measured by the same run on a corpus 16x
smaller) plus a quarter of the large corpus's int64 stream. A cgroup charges the page cache too (the mapped token
files, the mask), which the kernel reclaims at the limit; what it cannot reclaim, the run's own memory, must fit.
Needs root and a writable memory cgroup (v1 or v2); skipped elsewhere."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from experiments.bench_scale import write_corpus
from tests.launch import REPO

SMALL, LARGE = 2_000_000, 32_000_000  # corpus bytes (= byte tokens)
HEADROOM = 64 * 2**20  # above the small run's peak: a quarter of the large corpus's int64 stream (8 * LARGE = 256 MB)
OVERRIDES = ("+experiment=tiny", "data=text_files", "data.max_train_tokens=null", "data.max_eval_tokens=4000",
             "model.dim=16", "model.num_heads=2", "trainer.eval_batch_size=1024", "trainer.dump=stream",
             "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
             "trainer.threshold_scan=[0.0]", "trainer.progress=false", "wandb=disabled")  # fmt: skip


class MemoryCgroup:
    """A fresh memory cgroup (v2 or v1) that a child process joins before it starts."""

    def __init__(self) -> None:
        name = f"lego-test-{uuid.uuid4().hex[:8]}"
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text():
            self.path, self.limit_file, self.peak_file, self.unlimited = v2 / name, "memory.max", "memory.peak", "max"
        elif (v1 / "memory.limit_in_bytes").is_file():
            self.path, self.limit_file, self.unlimited = v1 / name, "memory.limit_in_bytes", "-1"
            self.peak_file = "memory.max_usage_in_bytes"
        else:
            pytest.skip("no memory cgroup here (v1 or v2)")
        try:
            self.path.mkdir()
        except OSError as err:
            pytest.skip(f"cannot create a memory cgroup: {err}")

    def run(self, command: list[str], limit: int | None) -> tuple[subprocess.CompletedProcess, int]:
        """`command` inside the cgroup (at most `limit` bytes; None: no limit); its result and peak usage."""
        (self.path / self.limit_file).write_text(str(limit) if limit else self.unlimited)
        procs = self.path / "cgroup.procs"
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env(),
                              preexec_fn=lambda: procs.write_text(str(os.getpid())))  # fmt: skip
        return proc, int((self.path / self.peak_file).read_text())

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true"}


@pytest.fixture
def cgroup():
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    group = MemoryCgroup()
    yield group
    group.remove()


def test_a_corpus_whose_int64_stream_exceeds_the_limit_trains_to_the_end(cgroup, tmp_path):
    def command(n_bytes: int) -> list[str]:
        corpus = tmp_path / f"corpus_{n_bytes}"
        write_corpus(corpus, n_bytes)
        run_dir, cache = tmp_path / f"run_{n_bytes}", tmp_path / f"cache_{n_bytes}"
        return [sys.executable, "train.py", *OVERRIDES, f"data.files=[{corpus}/*.txt]", f"hydra.run.dir={run_dir}",
                f"cache_dir={cache}"]  # fmt: skip

    small, peak = cgroup.run(command(SMALL), None)
    assert small.returncode == 0, small.stderr[-3000:]
    limit = peak + HEADROOM
    large, _ = cgroup.run(command(LARGE), limit)
    assert large.returncode == 0, f"killed or failed under {limit / 2**20:.0f} MB: {large.stderr[-3000:]}"
    results = json.loads((tmp_path / f"run_{LARGE}" / "results.json").read_text())
    assert results["blocks"][0]["train_tokens"] > 0
    stage_0 = json.loads((tmp_path / f"run_{LARGE}" / "stage_0" / "stats.json").read_text())
    assert stage_0["active_tokens"] * 8 > HEADROOM  # its int64 stream would not have fit above the fixed cost
