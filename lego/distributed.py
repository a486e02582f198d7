"""The few collective operations multi-process training needs, as no-ops in a single process.

`torchrun --nproc_per_node=N train.py ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `init_from_env` joins them into one process group (gloo on CPU, nccl
on CUDA). Without WORLD_SIZE, or with WORLD_SIZE=1, nothing is initialised and every helper below is
the identity, so a single process runs exactly the code it ran before this module existed.

Depends on torch only.
"""

from __future__ import annotations

import atexit
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the rank that writes results, checkpoints and logs (rank 0, or the only process)."""
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; True when running distributed.

    Idempotent (a Hydra multirun calls it once per job). On CUDA each process takes the GPU named by
    LOCAL_RANK before nccl starts, so collectives and the model share one device per rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(_shutdown)
    return True


def local_device() -> torch.device:
    """The GPU this process owns under torchrun (cuda:LOCAL_RANK), or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def per_rank(global_batch: int) -> int:
    """Sequences per rank for a global batch of `global_batch` sequences (rounded up, at least 1)."""
    return max(1, math.ceil(global_batch / world()[1]))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks (in place on the communication device); returned on its own device."""
    if world()[1] == 1:
        return tensor
    moved = tensor.to(_comm_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def global_sum(value: float) -> float:
    """A Python number summed over ranks (float64, so integer counts up to 2**53 stay exact)."""
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def global_min(value: int) -> int:
    """The smallest of every rank's `value`: what all ranks can agree to do (e.g. steps per epoch)."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor[0])


def all_gather_variable(tensor: Tensor) -> list[Tensor]:
    """Every rank's 1-d `tensor` (lengths may differ), in rank order, on the CPU.

    Collectives need equal shapes: lengths are gathered first, each tensor is padded to the longest,
    and the padding is cut off again.
    """
    if world()[1] == 1:
        return [tensor.cpu()]
    _, size = world()
    device = _comm_device()
    length = torch.tensor([tensor.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    longest = max(1, max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor.reshape(-1).to(device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    return [part[: int(n)].cpu() for part, n in zip(gathered, lengths, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def barrier() -> None:
    """Wait for every rank (e.g. until each has written its shard, before the stage is marked complete)."""
    if world()[1] > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo moves CPU tensors."""
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
