"""What every speed benchmark shares: its size arguments, random active masks, and side-by-side timing.

Timing is interleaved (one call of every point per round, after one warm-up call each, the order rotated
every round) and reported as the median per point, so machine noise hits every point alike and ratios
stay comparable. Without the rotation a point that always ran first was up to 9 % faster than the same
computation run second (bench_inference's "dense" and "0 %" points).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Hashable, Iterable

import torch


def size_parser(doc: str, *, layers: int, repeats: int, vocab: bool = False) -> argparse.ArgumentParser:
    """dim 512, 8 heads, seq 256, batch 8 by default: the realistic CPU size the issues ask for."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=layers)
    if vocab:
        parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def random_mask(share: float, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(share * tokens) active tokens, scattered at random (as hard tokens are)."""
    n = batch * seq
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[: round(share * n)]] = True
    return mask.view(batch, seq)


def interleaved_seconds(points: Iterable[Hashable], run: Callable[[Hashable], None], repeats: int) -> dict:
    """Wall times of `run(point)`, `repeats` per point, timed round robin after a warm-up call each, the
    order rotated every round: entry i of every list comes from the same round."""
    points = list(points)
    times: dict = {point: [] for point in points}
    for point in points:
        run(point)
    for round_index in range(repeats):
        shift = round_index % len(points)  # each point leads a round in turn: no point always follows another
        for point in points[shift:] + points[:shift]:
            start = time.perf_counter()
            run(point)
            times[point].append(time.perf_counter() - start)
    return times


def median_seconds(points: Iterable[Hashable], run: Callable[[Hashable], None], repeats: int) -> dict:
    """Median wall time of `run(point)` per point, timed round robin after a warm-up call each."""
    return {point: statistics.median(t) for point, t in interleaved_seconds(points, run, repeats).items()}


def per_round_ratios(times: dict, ours: Hashable, other: Hashable) -> list[float]:
    """`other`'s time over `ours` in each round of `interleaved_seconds`: above 1, ours was faster."""
    return [theirs / mine for mine, theirs in zip(times[ours], times[other], strict=True)]
