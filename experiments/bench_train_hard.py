"""Hard-token training: one training step of a block on a share of hard tokens, as a ratio to a dense step.

A step is `lego.fitting.train_step` (block forward on the active tokens, LM + exit losses, backward)
plus the AdamW update. The ideal ratio is the FLOP ratio of the work required: full layer work and
head for the hard tokens, K/V projections for the kept context tokens. Timed side by side, interleaved,
median of repeats. Target: <= 1.10 x the ideal at each ratio.

    python experiments/bench_train_hard.py                    # dim 512, 8 heads, 2 layers, vocab 4096, seq 256, batch 8
    python experiments/bench_train_hard.py --dim 64 --seq 32 --batch 2 --repeats 2     # smoke size
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.bench_block import random_mask
from lego import FitConfig, LEGOBlock, TrainingData
from lego.fitting import train_step

RATIOS = (1.0, 0.7, 0.5, 0.3, 0.1)
TARGET = 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    block = LEGOBlock(args.dim, args.heads, args.layers, max_seq_len=args.seq)
    block.attach_head(torch.nn.Linear(args.dim, args.vocab, bias=False).requires_grad_(False))  # frozen, as for k > 0
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.dim, generator=gen)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    batches = {r: TrainingData(hidden, targets, random_mask(r, args.batch, args.seq, gen)) for r in RATIOS}
    config, device = FitConfig(), torch.device("cpu")

    def step(ratio: float) -> float:
        start = time.perf_counter()
        loss = train_step(block, batches[ratio], None, config, device)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[float, list[float]] = {r: [] for r in RATIOS}
    for r in RATIOS:
        step(r)  # warm-up
    for _ in range(args.repeats):
        for r in RATIOS:
            times[r].append(step(r))
    n = args.batch * args.seq
    dense_ms = statistics.median(times[1.0]) * 1e3
    dense_flops = block.forward_flops(n, n, args.seq, n)
    print(
        f"train step (fwd+bwd+AdamW) of a {args.layers}-layer block: dim {args.dim}, vocab {args.vocab}, "
        f"seq {args.seq}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'hard':>6} {'ms':>8} {'ratio':>7} {'ideal':>7} {'ratio/ideal':>12}")
    rows = []
    for r in RATIOS:
        n_active = int(batches[r].active.sum())
        ms = statistics.median(times[r]) * 1e3
        ideal = block.forward_flops(n_active, n, args.seq, n_active) / dense_flops
        over = ms / dense_ms / ideal
        rows.append({"hard_ratio": r, "ratio": ms / dense_ms, "ideal": ideal, "over_ideal": over})
        flag = "" if over <= TARGET else f"  > {TARGET}"
        print(f"{r:>6.0%} {ms:>8.1f} {ms / dense_ms:>7.3f} {ideal:>7.3f} {over:>12.3f}{flag}")
    return rows


if __name__ == "__main__":
    main()
