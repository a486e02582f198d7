"""Launching several ranks from pytest: gloo on the CPU, a free port per launch."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.launch import REPO, offline_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(*args: str, nproc: int, cache_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=NPROC train.py ARGS` on this machine, with the environment of
    tests/launch.py's `run_train` (offline, progress bars off, its own cache)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "train.py"), "trainer.progress=false", *args,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env=offline_env(cache_dir), capture_output=True, text=True, timeout=timeout
    )


def _join_and_run(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Done, results on disk: leave without interpreter finalization, where gloo's worker threads can still
    # hold tensors and abort the process ("terminate called without an active exception", SIGABRT; seen
    # in 2 of 13 runs of test_fsdp.py on a loaded 2-core machine; see pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn: Callable, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined by a gloo process group.
    `fn` must be importable (module level); results go through files, not return values."""
    mp.start_processes(_join_and_run, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")

