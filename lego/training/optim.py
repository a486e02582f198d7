"""The optimizer side of every training method: AdamW parameter groups, the learning-rate schedule, and gradient
clipping with the exit classifiers on their own."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lego.sharding import clip_grad_norm


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices only (not norms, biases or the 1-d exit bias); tied weights counted once."""
    seen, decay, no_decay = set(), [], []
    for module in modules:
        for param in module.parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], sharded: bool = False) -> torch.optim.AdamW:
    """AdamW over `groups`, with the fused kernel (CPU and CUDA): the update costs the same whatever the share of
    hard tokens, so a slow one weighs most on steps over few of them (experiments/bench_train_hard.py). Sharded
    (FSDP) and plain tensors together take the per-parameter loop."""
    kernel = {"foreach": False} if sharded else {"fused": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kernel)


def lr_schedule(warmup_steps: int, min_lr_ratio: float, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class GradClipper:
    """Clips the language model's parameters under one norm and the exit classifiers' under another.

    An exit classifier reads a detached input, and its gradient (often several times the LM's norm early on)
    must not shrink the language model's steps through a shared clip norm: with one norm, a method with a
    learned confidence head trains a different LM than without it (the 6.5 % baseline gap of issue 19).
    `exit_classifiers` are the modules clipped on their own; the optimizer's order is kept within each set."""

    def __init__(self, optimizer: torch.optim.Optimizer, exit_classifiers: list[nn.Module], sharded: bool) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        exit_ids = {id(p) for module in exit_classifiers for p in module.parameters()}
        self.sets = [[p for p in params if id(p) not in exit_ids], [p for p in params if id(p) in exit_ids]]
        self.clip = clip_grad_norm if sharded else torch.nn.utils.clip_grad_norm_

    def __call__(self, max_norm: float) -> torch.Tensor:
        """Clip both sets; returns the language model's gradient norm (the one reported)."""
        lm_norm, _ = (self.clip(subset, max_norm) for subset in self.sets)
        return lm_norm
