"""The final evaluation (test, validation, threshold scan, speed-up timing) is never a silent minute: it says
what it is doing, and with progress bars on it shows one."""

import subprocess
import sys

from tests.launch import REPO, offline_env


def test_final_evaluation_shows_progress(tmp_path, cache_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "+experiment=tiny", "trainer.progress=true", "wandb=disabled",
         "data.max_train_tokens=10000", "trainer.threshold_scan=[0.0,0.5]", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=offline_env(cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final evaluation: test and validation through the exits, a threshold scan of 2 exit shares" in proc.stdout
    assert proc.stdout.index("final evaluation:") < proc.stdout.index("with early exit;")  # before the wait
    bar = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "speed-up timing" in line]
    assert bar and "5/5" in bar[-1]  # test, validation, two scan shares, the timing
