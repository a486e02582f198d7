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
    from collections.abc import Iterator

    from lego.model import LEGOBlock, LEGOTransformer, Routed

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


def evaluate_routed(
    model: LEGOTransformer, windows: Tensor, batch_size: int, device: torch.device, precision: str = DEFAULT_PRECISION
) -> dict:
    """Run `model(x, return_stats=True)` over (n, seq + 1) token windows with the blocks' current thresholds, in
    `precision` (`lego.training.precision`).

    Every token is scored with the logits of the block it exited at; per block we report the tokens that
    exited there (count, rate, PPL, accuracy) and the confidences of the tokens that reached it.
    """
    thresholds = [block.threshold for block in model.blocks]
    return evaluate_settings(model, windows, [thresholds], batch_size, device, precision)[0]


@torch.no_grad()
def evaluate_settings(
    model: LEGOTransformer,
    windows: Tensor,
    settings: list[list[float]],
    batch_size: int,
    device: torch.device,
    precision: str = DEFAULT_PRECISION,
    keep_confidences: int | None = None,
) -> list[dict]:
    """`evaluate_routed` at each setting of the blocks' thresholds (one threshold per block), in one pass over
    the windows: Block 0 runs once per batch for every setting (`LEGOTransformer.first_block`), the later blocks
    once per setting on the tokens that setting leaves them. A setting's `seconds` counts the Block 0 work it
    shares, as its own evaluation would. `keep_confidences=k`: each result also holds `confidences`, block k's
    confidence of every token that reached it (float32, on the CPU). The model's thresholds are restored."""
    if not settings:
        return []  # nothing to score: no pass over the windows
    model.eval()
    saved = [block.threshold for block in model.blocks]
    tallies = [_Tally(model, keep_confidences) for _ in settings]
    try:
        for batch in windows.split(batch_size):
            x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
            started = time.perf_counter()
            with autocast(device, precision):
                first = model.first_block(x)
            at_first = _scores(first.logits, y.flatten())  # every token scored at Block 0, for the exits there
            shared = time.perf_counter() - started
            for tally, thresholds in zip(tallies, settings, strict=True):
                started = time.perf_counter()
                for block, threshold in zip(model.blocks, thresholds, strict=True):
                    block.threshold = threshold
                with autocast(device, precision):
                    tally.add(model.route(x, first), y.flatten(), at_first)
                tally.seconds += shared + time.perf_counter() - started  # forwards plus scoring: what a user waits for
    finally:
        for block, threshold in zip(model.blocks, saved, strict=True):
            block.threshold = threshold
    return [tally.result(thresholds, windows.shape[1] - 1) for tally, thresholds in zip(tallies, settings, strict=True)]


def _scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's cross-entropy and whether its argmax is the target."""
    return cross_entropy_rows(logits, targets), logits.argmax(dim=-1) == targets


class _Tally:
    """One setting's sums over the batches of `evaluate_settings`."""

    def __init__(self, model: LEGOTransformer, keep_confidences: int | None) -> None:
        n = len(model.blocks)
        self.model, self.keep = model, keep_confidences
        self.ce_sum, self.correct, self.conf_sum = [0.0] * n, [0] * n, [0.0] * n
        self.exit_counts, self.active_counts = [0] * n, [0] * n
        self.histograms = [torch.zeros(HIST_BINS, dtype=torch.long) for _ in range(n)]
        self.kept: list[Tensor] = []
        self.seconds = 0.0

    def add(self, routed: Iterator[Routed | None], y: Tensor, at_first: tuple[Tensor, Tensor]) -> None:
        """One batch as `LEGOTransformer.route` computes it, `y` its flat targets: each token scored with the logits
        of the block it finishes in, no (tokens, vocab) tensor assembled. `at_first` is every token's (CE, correct)
        from Block 0's logits, which the tokens finishing there keep (their logits are those rows)."""
        for k, step in enumerate(routed):
            if step is None:
                continue
            out, exits = step
            if k == 0:
                ce, right = (t.index_select(0, out.logits_index) for t in at_first)
            else:
                ce, right = _scores(out.logits, y.index_select(0, out.logits_index))
            self.ce_sum[k] += float(ce.sum())
            self.correct[k] += int(right.sum())
            self.exit_counts[k] += int(exits.sum())
            self.active_counts[k] += int(out.active.sum())
            conf = out.confidence[out.active].float().cpu()
            self.conf_sum[k] += float(conf.sum())
            self.histograms[k] += torch.histc(conf, bins=HIST_BINS, min=0.0, max=1.0).long()
            if k == self.keep:
                self.kept.append(conf)

    def result(self, thresholds: list[float], seq_len: int) -> dict:
        model, exit_counts, active_counts = self.model, self.exit_counts, self.active_counts
        total = sum(exit_counts)
        loss = sum(self.ce_sum) / max(total, 1)
        blocks = []
        for k, block in enumerate(model.blocks):
            n = exit_counts[k]
            blocks.append({
                "block": k,
                "layers": block.num_layers,
                "threshold": thresholds[k] if k < len(model.blocks) - 1 else None,  # the last never exits early
                "reached": active_counts[k],
                "exit_count": n,
                "exit_rate": n / max(total, 1),
                "mean_confidence": self.conf_sum[k] / active_counts[k] if active_counts[k] else None,
                "ppl": perplexity(self.ce_sum[k] / n) if n else None,
                "acc": self.correct[k] / n if n else None,
            })  # fmt: skip
        edges = torch.linspace(0, 1, HIST_BINS + 1).tolist()
        return {
            "ppl": perplexity(loss),
            "loss": loss,
            "acc": sum(self.correct) / max(total, 1),
            "tokens": total,
            "exit_counts": exit_counts,
            "active_counts": active_counts,
            "exit_rates": [n / max(total, 1) for n in exit_counts],
            "shallow_ratio": 1.0 - exit_counts[-1] / max(total, 1),
            "compute_cost": model.compute_cost(exit_counts),
            "honest_cost": model.honest_cost(active_counts, seq_len),
            "blocks": blocks,
            "seconds": self.seconds,
            "confidence_histograms": [{"edges": edges, "counts": h.tolist()} for h in self.histograms],
            **({"confidences": torch.cat([torch.zeros(0), *self.kept])} if self.keep is not None else {}),
        }
