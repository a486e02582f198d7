"""Running a trained block over data: its input, per-token losses, evaluation, and propagation, the forward pass
that hands every token's state to the next block (inference routing as data, or the hard tokens' dump), and the
streamed hand-off's parts: `score` (confidences only) and `FrozenPrefix`, the frozen blocks that make a
`StreamedTrainingData`'s hidden states per batch (`stream_after`).

Under torch.distributed `evaluate` reports sums over all ranks' tokens; propagation is per rank (each its shard).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lego import distributed
from lego.model import cross_entropy_rows
from lego.training.precision import DEFAULT_PRECISION, autocast
from lego.training_data import HiddenStateWriter, MaskFile, StreamedTrainingData, TrainingData

if TYPE_CHECKING:
    from lego.model import BlockOutput, LEGOBlock


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def block_input(batch: TrainingData, embedding: nn.Embedding | None, weight: Tensor) -> Tensor:
    """The block's input on the device and in the dtype of `weight` (a parameter of the block): hidden
    states stored in lower precision (a bfloat16 dump) are widened back, so the block computes as it would
    on the states it was handed in memory. The copy is asynchronous from pinned memory (`lego.training.prefetch`)."""
    if batch.input_ids is not None:
        if embedding is None:
            raise ValueError("this TrainingData holds token ids: pass the embedding (Block 0's stage)")
        return embedding(batch.input_ids.to(weight.device, non_blocking=True))
    return batch.hidden_states.to(device=weight.device, dtype=weight.dtype, non_blocking=True)


def token_losses(out: BlockOutput, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE and correctness of the tokens that got logits, in `out.logits_index` order."""
    picked = targets.reshape(-1).index_select(0, out.logits_index).long()  # int32 when read from a file
    return cross_entropy_rows(out.logits, picked), out.logits.argmax(dim=-1) == picked


@torch.no_grad()
def evaluate(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    precision: str = DEFAULT_PRECISION,
) -> dict:
    """Loss, PPL and accuracy of `block` on `data`'s active tokens, plus their confidences; the forwards in
    `precision` (`lego.training.precision`).

    Under torch.distributed `data` is this rank's shard: loss, PPL, accuracy and `tokens` are over all
    ranks' tokens, `confidence` is this rank's only (gather it where the whole set is needed)."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    device = weight.device
    total_ce, correct, count, confidences = 0.0, 0, 0, []
    for batch in data.batches(batch_size):
        with autocast(device, precision):
            active = batch.active.to(device, non_blocking=True)
            out = block.run(block_input(batch, embedding, weight), active, logits_for="active")
        ce, right = token_losses(out, batch.targets.to(device, non_blocking=True))
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
    (sequences, seq[, dim]). Sequences with no active token are not run; their hidden state (the one `data.select`
    gives: stored, or computed by a `StreamedTrainingData`'s frozen blocks) is kept. `out` (e.g. a memory-mapped
    file) receives the hidden states instead of a new tensor; a new one has the dtype of `data`'s stored states."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    hidden = out if out is not None or data.hidden_states is None else torch.empty_like(data.hidden_states)
    confidence = torch.zeros(data.targets.shape)
    should_exit = torch.zeros(data.targets.shape, dtype=torch.bool)
    for index in torch.arange(data.num_sequences).split(batch_size):
        batch = data.select(index)
        if bool(batch.active.any()):
            result = block.run(block_input(batch, embedding, weight), batch.active.to(weight.device), "none")
            states = result.hidden
            confidence[index] = result.confidence.float().cpu()
            should_exit[index] = result.should_exit.cpu()
        elif batch.hidden_states is None:  # token ids: the kept state of an idle sequence would be its embedding
            raise ValueError("Block 0's data must have an active token in every sequence")
        else:
            states = batch.hidden_states
        if hidden is None:
            hidden = torch.empty(*data.targets.shape, states.shape[-1], dtype=states.dtype)
        hidden[index] = states.to("cpu", hidden.dtype)  # `hidden` may be lower precision (a bfloat16 dump)
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


@torch.no_grad()
def score(block: LEGOBlock, data: TrainingData, embedding: nn.Embedding | None, batch_size: int, out: Tensor) -> None:
    """`propagate`'s confidences alone, into `out` (sequences, seq) float32 (e.g. `ScratchFloats`, a file): what the
    streamed hand-off selects from, without the hidden states. Only sequences with an active token are run, in
    order, `batch_size` at a time; the other rows of `out` are left as they are."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    for index in data.active.any(dim=1).nonzero().squeeze(1).split(batch_size):
        batch = data.select(index)
        result = block.run(block_input(batch, embedding, weight), batch.active.to(weight.device), "none")
        out[index] = result.confidence.float().cpu()
    block.train(was_training)


class FrozenPrefix:
    """Trained, frozen blocks run over a batch's inputs, each on its own active tokens (`steps`: (block, its active
    mask over all sequences), in order): how a `StreamedTrainingData` makes each batch's hidden states, exactly the
    computation that made them for a dump. No grad, in `precision` (bf16 autocast on CUDA by default, float32 on
    the CPU). `flops` counts the forward FLOPs it has run."""

    def __init__(
        self, embedding: nn.Embedding | None, steps: list[tuple[LEGOBlock, Tensor | MaskFile]], precision: str
    ) -> None:
        self.embedding, self.steps, self.precision, self.flops = embedding, steps, precision, 0.0
        self.seconds, self.windows = 0.0, 0  # the time it took (on the device: synchronised) and the windows it ran

    def then(self, block: LEGOBlock, active: Tensor | MaskFile) -> FrozenPrefix:
        """This prefix followed by `block` on the tokens `active` marks (a new count of FLOPs)."""
        return FrozenPrefix(self.embedding, [*self.steps, (block, active)], self.precision)

    @torch.no_grad()
    def __call__(self, batch: TrainingData, rows: Tensor) -> Tensor:
        """The hidden states after the last block of `batch`, the sequences at `rows`."""
        started = time.perf_counter()
        weight = self.steps[0][0].exit_classifier.weight
        hidden = block_input(batch, self.embedding, weight)
        with autocast(weight.device, self.precision):
            for block, active in self.steps:
                block.eval()  # frozen: whatever mode a resume or a caller left it in
                mask = active[rows]
                hidden = block.run(hidden, mask.to(weight.device), "none").hidden
                self.flops += run_flops(block, int(mask.count_nonzero()), mask.numel(), mask.shape[-1])
        self.seconds += time.perf_counter() - started  # on CUDA, unsynchronised: the time to queue the work
        self.windows += len(rows)
        return hidden


def stream_after(
    block: LEGOBlock, data: TrainingData, embedding: nn.Embedding | None, hard: Tensor | MaskFile, precision: str
) -> StreamedTrainingData:
    """The next block's inputs as a `StreamedTrainingData` (`trainer.dump=stream`): `data`'s (stored, or streamed
    themselves) run through `block` on `data`'s active tokens, with the mask `hard` as the active ones."""
    if isinstance(data, StreamedTrainingData):
        return StreamedTrainingData(data.source, hard, data.prefix.then(block, data.active))
    return StreamedTrainingData(data, hard, FrozenPrefix(embedding, [(block, data.active)], precision))


def collect_flops(block: LEGOBlock, data: TrainingData) -> float:
    """Forward FLOPs of `propagate` over `data`: every sequence with an active token is run (its kept tokens
    for K/V)."""
    return run_flops(block, len(data), int(data.active.any(dim=1).sum()) * data.seq_len, data.seq_len)


def run_flops(block: LEGOBlock, n_active: int, n_tokens: int, seq_len: int) -> float:
    """Forward FLOPs of `block.run(..., logits_for="none")` on `n_tokens` tokens of which `n_active` are active, with
    head work only when the confidence is read off the logits."""
    n_logits = 0 if block.confidence_method == "learned" else n_active
    return block.forward_flops(n_active, n_tokens, seq_len, n_logits)
