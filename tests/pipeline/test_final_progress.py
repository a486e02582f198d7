"""The final evaluation (test, validation, threshold scan, speed-up timing) is never a silent minute: it says
what it is doing, and with progress bars on it shows one that moves through the timing pass by pass; the
timing's line says how noisy the machine was."""

import json
import subprocess
import sys

from lego.pipeline.evaluation import timing_passes
from tests.launch import REPO, offline_env


def test_final_evaluation_shows_progress(tmp_path, cache_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "+experiment=tiny", "trainer.progress=true", "wandb=disabled",
         "data.max_train_tokens=10000", "trainer.threshold_scan=[0.0,0.5]", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=offline_env(cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    announced = "final evaluation: test and validation through the exits and a threshold scan of 2 exit shares"
    assert announced in proc.stdout
    assert proc.stdout.index("final evaluation:") < proc.stdout.index("with early exit;")  # before the wait
    bar = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "speed-up timing" in line]
    total = 1 + 2 + timing_passes()  # tiny has 2 blocks: Block 0's calibration, test, validation, then the timing
    assert bar and f"{total}/{total}" in bar[-1]
    # the timing's verdict: its noise floor from equal-work pairs, the machine's load, and the line saying so
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["inference_speedup_null_rounds"]) == len(results["inference_speedup_rounds"]) - 1
    assert results["inference_speedup_noise"] >= 0
    assert set(results["inference_speedup_load"]) == {"start", "end", "cpus"}
    caveat = results["inference_speedup_caveat"]
    assert caveat in (None, "machine busy", "noisy timings")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("measured speed-up over full depth"))
    assert "noise floor ±" in line and f"on {results['inference_speedup_load']['cpus']} CPUs" in line
    assert ("not meaningful" in line) == (caveat is not None)
