"""A full disk is one error naming the file and the bytes it needs, never a SIGBUS or a C++ traceback; nothing
already written is damaged and no temporary file stays (issue 18). Written files get the umask's permissions."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from lego.atomic import atomic_write
from lego.errors import DiskFullError
from lego.training_data import HiddenStateWriter
from tests.launch import run_train


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_atomic_write_that_fills_the_disk_keeps_the_old_file(small_disk):
    target = small_disk / "results.json"
    target.write_text("the old results\n")
    with pytest.raises(DiskFullError, match=r"no space left on the device to write .*results\.json"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"x" * (4 << 20)))
    assert target.read_text() == "the old results\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["results.json"]


def test_a_checkpoint_that_fills_the_disk_is_one_error_not_a_cpp_traceback(small_disk):
    checkpoint = {"weights": torch.zeros(1 << 20)}  # 4 MB
    with pytest.raises(DiskFullError) as caught:
        atomic_write(small_disk / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))
    assert "\n" not in str(caught.value) and "checkpoint.pt" in str(caught.value)
    assert list(small_disk.iterdir()) == []


def test_a_dump_larger_than_the_free_space_is_refused_before_any_state_is_written(small_disk):
    with pytest.raises(DiskFullError, match=r"hard_tokens\.safetensors \(\d[\d.,]* MB needed, [\d.,]+ MB free\)"):
        HiddenStateWriter(small_disk / "hard_tokens.safetensors", 64, 128, 64)  # 2 MB of states and more
    assert list(small_disk.iterdir()) == []
    with HiddenStateWriter(small_disk / "small.safetensors", 2, 8, 4) as writer:  # what fits is written as ever
        writer.hidden[:] = 1.0
        writer.finish(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.bool))
    assert (small_disk / "small.safetensors").is_file()


def test_a_run_whose_dump_does_not_fit_is_refused_before_training(small_disk, cache_dir):
    """The plan (`lego.pipeline.plan`) sees, before any stage trains, that the hand-off cannot fit the disk."""
    run_dir = small_disk / "run"
    proc = run_train("+experiment=tiny", "wandb=disabled", f"hydra.run.dir={run_dir}", cache_dir=cache_dir)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"trainer.dump=keep needs [\d.]+ MB of disk for the hand-off but [\d.]+ MB are free", errors[0])
    assert "use trainer.dump=stream" in errors[0]
    assert not list(run_dir.glob("stage_*/*")) and not list(run_dir.rglob(".*.tmp"))  # nothing trained or written


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "report.html", lambda tmp: tmp.write_text("<html></html>"))
        with HiddenStateWriter(tmp_path / "dump.safetensors", 1, 2, 2) as writer:
            writer.finish(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    finally:
        os.umask(old)
    for name in ("report.html", "dump.safetensors"):
        assert (Path(tmp_path) / name).stat().st_mode & 0o777 == mode, name
