"""Running a trained block over data: its input, per-token losses, evaluation, and propagation, the forward pass
that hands every token's state to the next block (inference routing as data, or the hard tokens' dump).

Under torch.distributed `evaluate` reports sums over all ranks' tokens; propagation is per rank (each its shard).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego import distributed
from lego.training_data import HiddenStateWriter, TrainingData

if TYPE_CHECKING:
    from lego.model import BlockOutput, LEGOBlock


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def block_input(batch: TrainingData, embedding: nn.Embedding | None, weight: Tensor) -> Tensor:
    """The block's input on the device and in the dtype of `weight` (a parameter of the block): hidden
    states stored in lower precision (a bfloat16 dump) are widened back, so the block computes as it would
    on the states it was handed in memory."""
    if batch.input_ids is not None:
        if embedding is None:
            raise ValueError("this TrainingData holds token ids: pass the embedding (Block 0's stage)")
        return embedding(batch.input_ids.to(weight.device))
    return batch.hidden_states.to(device=weight.device, dtype=weight.dtype)


def token_losses(out: BlockOutput, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE and correctness of the tokens that got logits, in `out.logits_index` order."""
    picked = targets.reshape(-1).index_select(0, out.logits_index).long()  # int32 when read from a file
    ce = F.cross_entropy(out.logits.float(), picked, reduction="none")
    return ce, out.logits.argmax(dim=-1) == picked


@torch.no_grad()
def evaluate(block: LEGOBlock, data: TrainingData, embedding: nn.Embedding | None, batch_size: int) -> dict:
    """Loss, PPL and accuracy of `block` on `data`'s active tokens, plus their confidences.

    Under torch.distributed `data` is this rank's shard: loss, PPL, accuracy and `tokens` are over all
    ranks' tokens, `confidence` is this rank's only (gather it where the whole set is needed)."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    device = weight.device
    total_ce, correct, count, confidences = 0.0, 0, 0, []
    for batch in data.batches(batch_size):
        out = block.run(block_input(batch, embedding, weight), batch.active.to(device), logits_for="active")
        ce, right = token_losses(out, batch.targets.to(device))
        total_ce += float(ce.sum())
        correct += int(right.sum())
        count += ce.numel()
        confidences.append(out.confidence[out.active].cpu())
    block.train(was_training)
    if distributed.world()[1] > 1:  # `data` is this rank's shard: report the whole set
        sums = distributed.all_reduce_sum(torch.tensor([total_ce, correct, count], dtype=torch.float64))
        total_ce, correct, count = float(sums[0]), int(sums[1]), int(sums[2])
    loss = total_ce / max(count, 1)
    return {
        "loss": loss,
        "ppl": perplexity(loss),
        "acc": correct / max(count, 1),
        "tokens": count,
        "confidence": torch.cat(confidences) if confidences else torch.zeros(0),
    }


@torch.no_grad()
def propagate(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the block over every sequence: (hidden after the block, confidence, should_exit), all
    (sequences, seq[, dim]). Sequences with no active token are not run; their hidden state is kept.
    `out` (e.g. a memory-mapped file) receives the hidden states instead of a new tensor."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    if out is not None:
        hidden = out
        if data.hidden_states is not None:
            idle = ~data.active.any(dim=1)
            hidden[idle] = data.hidden_states[idle].to(hidden.dtype)
    else:
        hidden = data.hidden_states.clone() if data.hidden_states is not None else None
    confidence = torch.zeros(data.targets.shape)
    should_exit = torch.zeros(data.targets.shape, dtype=torch.bool)
    rows = torch.arange(data.num_sequences)
    for start in range(0, data.num_sequences, batch_size):
        index = rows[start : start + batch_size]
        batch = data.select(index)
        if not bool(batch.active.any()):
            if hidden is None:  # token ids: the kept state of an idle sequence is its embedding
                raise ValueError("Block 0's data must have an active token in every sequence")
            continue
        out = block.run(block_input(batch, embedding, weight), batch.active.to(weight.device), logits_for="none")
        if hidden is None:
            hidden = torch.empty(*data.targets.shape, out.hidden.shape[-1], dtype=out.hidden.dtype)
        hidden[index] = out.hidden.to("cpu", hidden.dtype)  # `hidden` may be lower precision (a bfloat16 dump)
        confidence[index] = out.confidence.float().cpu()
        should_exit[index] = out.should_exit.cpu()
    block.train(was_training)
    return hidden, confidence, should_exit


def propagate_to_file(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    path: str | Path,
    next_active: Callable[[Tensor, Tensor], Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """`propagate` straight into a TrainingData file (never whole in memory); its active mask is
    `next_active(confidence, should_exit)`, its hidden states in `dtype` (None: the block's own)."""
    dtype = dtype or block.exit_classifier.weight.dtype
    with HiddenStateWriter(path, data.num_sequences, data.seq_len, block.dim, dtype) as out:
        _, confidence, should_exit = propagate(block, data, embedding, batch_size, out=out.hidden)
        out.finish(data.targets, next_active(confidence, should_exit))


def collect_flops(block: LEGOBlock, data: TrainingData) -> float:
    """Forward FLOPs of `propagate` over `data`: every sequence with an active token is run (its kept tokens
    for K/V), with head work only when the confidence is read off the logits."""
    run_tokens = int(data.active.any(dim=1).sum()) * data.seq_len
    n_logits = 0 if block.confidence_method == "learned" else len(data)
    return block.forward_flops(len(data), run_tokens, data.seq_len, n_logits)
