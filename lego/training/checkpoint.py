"""Step checkpoints, one format for every method: the trained modules' weights, the optimizer and schedule, and the
loop's state (step, epoch, early stopping, evaluations, tokens and FLOPs so far), plain tensors and numbers only.

A checkpoint is written at every validation and every `checkpoint_every_steps` steps between them, and resumes the
stage exactly where it left off: the same batch of the same epoch (same shuffle, same order; the batches done are
skipped without being built), with the steps since the last validation (`Period.saved`, in the loop's state), so
the next validation's row is the uninterrupted one's. Under FSDP it holds full tensors (gathered on every rank,
written by rank 0): resumable on any number of ranks, with or without FSDP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lego import distributed
from lego.atomic import atomic_write
from lego.errors import DataError
from lego.sharding import full_tensors, is_sharded, shard_like

CHECKPOINT_KEYS = ("weights", "optimizer", "scheduler", "state", "evals", "train_tokens", "train_flops")


def load_checkpoint(path: Path, device: torch.device, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """A step checkpoint, plain tensors and numbers only (`weights_only=True`: nothing is unpickled); one that
    holds anything else, is damaged, or lacks `keys` is a one-line DataError saying to delete it."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... here
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(
            f"{path} cannot be loaded as a plain-tensor checkpoint ({reason}); delete it to restart the stage"
        ) from None
    missing = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise DataError(f"{path} is not a LEGO checkpoint (no {', '.join(missing)}); delete it to restart the stage")
    return saved


def snapshot(modules: list[nn.Module]) -> list[dict[str, Tensor]]:
    """A detached copy of every module's state (the best weights so far, or a checkpoint's)."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def load_trained(modules: list[nn.Module], states: list[dict[str, Tensor]]) -> None:
    """Load full or sharded states; full tensors are cut to this rank's shards where a module is sharded."""
    with torch.no_grad():
        for module, module_state in zip(modules, states, strict=True):
            current = module.state_dict()
            if any(is_sharded(value) for value in current.values()):
                module_state = shard_like(module_state, current)
            module.load_state_dict(module_state)


def save_checkpoint(path: Path, modules: list[nn.Module], optimizer, scheduler, record: dict, sharded: bool) -> None:
    """Atomic (temp file + rename); plain tensors and numbers only, so `weights_only=True` loads it.
    Full tensors even under FSDP (gathered on every rank, written by rank 0): resumable on any number of
    ranks, with or without FSDP. The ranks otherwise hold identical states: rank 0 writes the one file."""
    checkpoint = {
        "weights": snapshot(modules),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **{key: record[key] for key in CHECKPOINT_KEYS[3:]},  # the loop's state, evaluations, tokens, FLOPs
    }
    if sharded:
        checkpoint = full_tensors(checkpoint)
    if distributed.is_main():
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
