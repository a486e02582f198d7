"""Inference routing: the tokens a trained block passes on (`route`, the validation set each later stage trains
against), and a whole model's held-out evaluation through TRUE early exit (`evaluate_routed`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lego.model import cross_entropy_rows
from lego.training.precision import DEFAULT_PRECISION, autocast
from lego.training.propagation import perplexity, propagate, propagate_to_file
from lego.training_data import TrainingData

if TYPE_CHECKING:
    from lego.model import LEGOBlock, LEGOTransformer

HIST_BINS = 50


def route(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    stream_to: str | Path | None = None,
    precision: str = DEFAULT_PRECISION,
) -> TrainingData:
    """Inference routing as data: the tokens that do not exit at this block stay active for the next one
    (the validation set each later stage trains against), the forwards in `precision`. `stream_to`: write it
    to this file as it is computed and return it memory-mapped, instead of building it in memory."""
    with autocast(block.exit_classifier.weight.device, precision):
        if stream_to is None:
            hidden, _, should_exit = propagate(block, data, embedding, batch_size)
            return TrainingData(hidden, data.targets, data.active & ~should_exit)
        propagate_to_file(block, data, embedding, batch_size, stream_to, lambda _, exits: data.active & ~exits)
    return TrainingData.load(stream_to, mmap=True)


@torch.no_grad()
def evaluate_routed(
    model: LEGOTransformer, windows: Tensor, batch_size: int, device: torch.device, precision: str = DEFAULT_PRECISION
) -> dict:
    """Run `model(x, return_stats=True)` over (n, seq + 1) token windows with the blocks' current thresholds, in
    `precision` (`lego.training.precision`).

    Every token is scored with the logits of the block it exited at; per block we report the tokens that
    exited there (count, rate, PPL, accuracy) and the confidences of the tokens that reached it.
    """
    model.eval()
    n_blocks = len(model.blocks)
    ce_sum, correct = [0.0] * n_blocks, [0] * n_blocks
    exit_counts, active_counts = [0] * n_blocks, [0] * n_blocks
    conf_sum = [0.0] * n_blocks
    histograms = [torch.zeros(HIST_BINS, dtype=torch.long) for _ in range(n_blocks)]
    seq_len = windows.shape[1] - 1
    started = time.perf_counter()
    for batch in windows.split(batch_size):
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with autocast(device, precision):
            logits, stats = model(x, return_stats=True)
        ce = cross_entropy_rows(logits.flatten(0, 1), y.flatten()).view_as(y)
        right = logits.argmax(dim=-1) == y
        for k in range(n_blocks):
            exited = stats.exit_block == k
            ce_sum[k] += float(ce[exited].sum())
            correct[k] += int(right[exited].sum())
            exit_counts[k] += stats.exit_counts[k]
            active_counts[k] += stats.active_counts[k]
            conf = stats.confidences[k].float().cpu()
            conf_sum[k] += float(conf.sum())
            histograms[k] += torch.histc(conf, bins=HIST_BINS, min=0.0, max=1.0).long()
    seconds = time.perf_counter() - started  # forward passes plus scoring: what a user waits for
    total = sum(exit_counts)
    loss = sum(ce_sum) / max(total, 1)
    blocks = []
    for k, block in enumerate(model.blocks):
        n = exit_counts[k]
        blocks.append({
            "block": k,
            "layers": block.num_layers,
            "threshold": block.threshold if k < n_blocks - 1 else None,  # the last block never exits early
            "reached": active_counts[k],
            "exit_count": n,
            "exit_rate": n / max(total, 1),
            "mean_confidence": conf_sum[k] / active_counts[k] if active_counts[k] else None,
            "ppl": perplexity(ce_sum[k] / n) if n else None,
            "acc": correct[k] / n if n else None,
        })  # fmt: skip
    edges = torch.linspace(0, 1, HIST_BINS + 1).tolist()
    return {
        "ppl": perplexity(loss),
        "loss": loss,
        "acc": sum(correct) / max(total, 1),
        "tokens": total,
        "exit_counts": exit_counts,
        "active_counts": active_counts,
        "exit_rates": [n / max(total, 1) for n in exit_counts],
        "shallow_ratio": 1.0 - exit_counts[-1] / max(total, 1),
        "compute_cost": model.compute_cost(exit_counts),
        "honest_cost": model.honest_cost(active_counts, seq_len),
        "blocks": blocks,
        "seconds": seconds,
        "confidence_histograms": [{"edges": edges, "counts": h.tolist()} for h in histograms],
    }
