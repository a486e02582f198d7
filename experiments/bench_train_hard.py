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

import torch

from experiments.bench_common import median_seconds, random_mask, size_parser
from lego import FitConfig, LEGOBlock, TrainingData
from lego.fitting import train_step
from lego.training.optim import adamw, param_groups

RATIOS = (1.0, 0.7, 0.5, 0.3, 0.1)
TARGET = 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return size_parser(__doc__, layers=2, repeats=8, vocab=True).parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    block = LEGOBlock(args.dim, args.heads, args.layers, max_seq_len=args.seq)
    block.attach_head(torch.nn.Linear(args.dim, args.vocab, bias=False).requires_grad_(False))  # frozen, as for k > 0
    config, device = FitConfig(lr=1e-4), torch.device("cpu")
    optimizer = adamw(param_groups([block], config.weight_decay), config.lr, (config.beta1, config.beta2))  # the loop's
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.dim, generator=gen)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    batches = {r: TrainingData(hidden, targets, random_mask(r, args.batch, args.seq, gen)) for r in RATIOS}

    def step(ratio: float) -> None:
        loss = train_step(block, batches[ratio], None, config, device)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(RATIOS, step, args.repeats)
    n = args.batch * args.seq
    dense_ms = seconds[1.0] * 1e3
    dense_flops = block.forward_flops(n, n, args.seq, n)
    print(
        f"train step (fwd+bwd+AdamW) of a {args.layers}-layer block: dim {args.dim}, vocab {args.vocab}, "
        f"seq {args.seq}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'hard':>6} {'ms':>8} {'ratio':>7} {'ideal':>7} {'ratio/ideal':>12}")
    rows = []
    for r in RATIOS:
        n_active = int(batches[r].active.sum())
        ms = seconds[r] * 1e3
        ideal = block.forward_flops(n_active, n, args.seq, n_active) / dense_flops
        over = ms / dense_ms / ideal
        rows.append({"hard_ratio": r, "ratio": ms / dense_ms, "ideal": ideal, "over_ideal": over})
        flag = "" if over <= TARGET else f"  > {TARGET}"
        print(f"{r:>6.0%} {ms:>8.1f} {ms / dense_ms:>7.3f} {ideal:>7.3f} {over:>12.3f}{flag}")
    return rows


if __name__ == "__main__":
    main()
