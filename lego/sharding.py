"""FSDP2 for one stage's training (`FitConfig.fsdp`, `trainer.fsdp=true` under torchrun).

Every transformer layer of the block being trained is sharded over the ranks with `fully_shard`: its
parameters, gradients and AdamW state each live 1/N on every rank, and a layer's full weights exist only
while it computes (all-gathered before, freed after). That is what lets a block whose training state does
not fit one device train at all. Replicated as with DDP: the block's output norm and exit classifier and,
in Block 0's stage, the embedding and the shared head.

The reduce-scatter sums gradients (divide factor 1, sum-only collectives, which gloo needs): each rank
already weights its loss by its share of the step's tokens (`lego.fitting`), exactly as without FSDP.

In bf16 (`trainer.precision`, `mixed_precision`) the layers' weights are all-gathered and computed with in bf16
(half the bytes on the wire) and their gradients reduced in float32; the sharded weights, AdamW's state and the
layers' outputs stay float32. In float32 nothing is cast.

Outside a training step the block runs with plain, full weights:
- `gathered()`: validation inside training, where ranks run different numbers of batches, gathers each
  layer once and runs every forward without collectives;
- `release()`: when training ends, every layer goes back to a plain module holding its full weights, so
  calibration, hard-token collection, saving and later stages run the ordinary single-device code.

Depends on torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from lego import distributed

if TYPE_CHECKING:
    from lego.model import LEGOBlock


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's policy for forwards in `param_dtype` (`lego.training.precision.autocast_dtype`; None: float32):
    weights gathered and used in it, gradients reduced in float32, outputs handed back in float32 (the block
    writes them into its float32 hidden states). None: no casts at all."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)


class ShardedLayers:
    """The layers of `block`, sharded in place over every rank until `release()`, computing in `param_dtype`
    (`mixed_precision`)."""

    def __init__(self, block: LEGOBlock, param_dtype: torch.dtype | None = None) -> None:
        self.block = block
        device = next(block.parameters()).device
        mesh = init_device_mesh(device.type, (distributed.world()[1],))
        # empty copies to put the full weights back into at release(); built one layer at a time
        self._plain = [copy.deepcopy(layer).to("meta") for layer in block.layers]
        self._device = device
        for layer in block.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mixed_precision(param_dtype))
            register_fsdp_forward_method(layer, "forward_sparse")  # the sparse path is not `forward`
            layer.set_gradient_divide_factor(1.0)
            layer.set_force_sum_reduction_for_comms(True)

    @property
    def layers(self) -> list[FSDPModule]:
        return list(self.block.layers)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Full weights on every rank for the body (e.g. validation): forwards need no collective."""
        for layer in self.layers:
            layer.unshard()
            layer.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.reshard()
                layer.set_reshard_after_forward(True)

    def release(self) -> None:
        """Every layer back to a plain module with its full weights (a collective: every rank calls it)."""
        for i, layer in enumerate(self.layers):
            state = full_tensors(layer.state_dict())
            plain = self._plain[i].to_empty(device=self._device)
            plain.load_state_dict(state)
            self.block.layers[i] = plain
        self._plain = []


def full_tensors(obj: Any) -> Any:
    """`obj` (nested dicts, lists, tuples) with every DTensor replaced by its full tensor. A collective:
    every rank must call it on the same structure."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {key: full_tensors(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(value) for value in obj)
    return obj


def shard_like(state: dict[str, Tensor], reference: dict[str, Any]) -> dict[str, Tensor]:
    """Full tensors of `state` cut into this rank's shards wherever `reference` holds a DTensor (loading a
    full checkpoint into sharded modules or optimizer state, on any number of ranks)."""
    return {key: _shard_as(value, reference.get(key)) for key, value in state.items()}


def shard_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (`full_tensors(optimizer.state_dict())`) with each parameter's moments
    sharded like the parameter, ready for `optimizer.load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, moments in saved["state"].items():
        param = params[int(index)]
        # moments shaped like the parameter are sharded like it; the scalar step count is not
        state[index] = {
            key: _shard_as(value, param) if getattr(value, "shape", None) == param.shape else value
            for key, value in moments.items()
        }
    return {**saved, "state": state}


def _shard_as(value: Any, like: Any) -> Any:
    """A full tensor `value` cut into this rank's shard the way `like` (a DTensor) is; anything else as is."""
    if isinstance(like, DTensor) and isinstance(value, Tensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)
    return value


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over a mix of sharded (DTensor) and replicated gradients: the
    shards' squares are summed over ranks, the replicated ones counted once. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)]
    plain = [g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)]
    squares = torch.stack(sharded).sum().cpu() if sharded else torch.zeros(())
    total = distributed.all_reduce_sum(squares.reshape(1).double())[0]
    if plain:
        total = total + torch.stack(plain).sum().cpu().double()
    norm = total.sqrt()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm.float()


def is_sharded(param: Tensor) -> bool:
    return isinstance(param, DTensor)
