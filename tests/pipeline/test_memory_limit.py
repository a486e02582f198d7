"""The whole pipeline's own memory grows far less than its corpus's token stream (issue "a billion tokens on one
machine"): preparation streams the text into token files and hands freed memory back, training maps them, the
hand-off is a 1-byte mask read by file reads (`trainer.dump=stream`), so a run on a corpus 16x larger owns less
extra memory than its int64 token stream alone would take (measured on 2026-12-02: 372 MB owned at 1M tokens and
378 MB at 16M, 398 MB at 32M; before the fixes in docs/scaling.md, 563 MB at 2M and 723 MB at 32M, and the old path
took 27-34 bytes a token).

Owned memory is the process's anonymous resident memory (RssAnon, sampled every 20 ms): what the OS cannot drop.
Pages of the mapped token files are page cache, which it can. (A hard memory-cgroup limit was tried first: on a
loaded machine the cgroup's page cache, charged with the rest, was not written back fast enough and a run that
fits was killed, so the test measures instead of limiting.)"""

import json
import subprocess
import sys
import threading
from pathlib import Path

from experiments.bench_scale import write_corpus
from tests.launch import REPO

SMALL, LARGE = 1_000_000, 16_000_000  # corpus bytes (= byte tokens)
STREAM_MB = 8 * LARGE / 2**20  # the large corpus as int64 tokens: 122 MB
OVERRIDES = ("+experiment=tiny", "data=text_files", "data.max_train_tokens=null", "data.max_eval_tokens=4000",
             "model.dim=16", "model.num_heads=2", "trainer.eval_batch_size=1024", "trainer.dump=stream",
             "block_schedule.blocks.0.max_steps=3", "block_schedule.blocks.1.max_steps=3",
             "trainer.threshold_scan=[0.0]", "trainer.progress=false", "wandb=disabled")  # fmt: skip


def owned_peak_mb(command: list[str]) -> tuple[subprocess.Popen, str, float]:
    """Run `command`; (its process, its stderr, its peak RssAnon in MB)."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true",
                                 "PATH": "/usr/bin:/bin"})  # fmt: skip
    peak = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                line = next(line for line in status.read_text().splitlines() if line.startswith("RssAnon:"))
                peak[0] = max(peak[0], int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            threading.Event().wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.communicate()[1]
    sampler.join()
    return proc, stderr, peak[0] / 1024


def test_a_corpus_16x_larger_owns_less_extra_memory_than_its_int64_stream(tmp_path):
    def command(n_bytes: int) -> list[str]:
        corpus = tmp_path / f"corpus_{n_bytes}"
        write_corpus(corpus, n_bytes)
        run_dir, cache = tmp_path / f"run_{n_bytes}", tmp_path / f"cache_{n_bytes}"
        return [sys.executable, "train.py", *OVERRIDES, f"data.files=[{corpus}/*.txt]", f"hydra.run.dir={run_dir}",
                f"cache_dir={cache}"]  # fmt: skip

    small, err, small_mb = owned_peak_mb(command(SMALL))
    assert small.returncode == 0, err[-3000:]
    large, err, large_mb = owned_peak_mb(command(LARGE))
    assert large.returncode == 0, err[-3000:]
    assert large_mb - small_mb < STREAM_MB, f"owned memory {large_mb:.0f} MB against {small_mb:.0f} MB"
    summary = json.loads((tmp_path / f"run_{LARGE}" / "results.json").read_text())["data"]
    assert summary["tokens"]["train"] > 0.85 * LARGE  # the corpus was read whole (val and test are capped)
