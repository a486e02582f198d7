"""Wall time of one LEGOBlock with a share of active tokens, as a ratio to the dense block, beside the ideal.

The ideal ratio is the FLOP ratio of the work really required: full layer work for active tokens, K/V
projections for kept ones (`LEGOBlock.layer_flops`). Everything is timed side by side in one run and
interleaved (round robin, median of repeats), so machine noise hits every point alike.

    python experiments/bench_block.py                      # dim 512, 8 heads, seq 256, batch 8, 2 layers
    python experiments/bench_block.py --dim 64 --seq 32 --repeats 2   # smoke size
"""

from __future__ import annotations

import argparse

import torch

from experiments.bench_common import median_seconds, random_mask, size_parser
from lego import LEGOBlock

SHARES = (1.0, 0.75, 0.5, 0.25, 0.1, 0.0)
ALL_MASK = "100% (mask)"  # an all-True mask must cost what active=None costs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = size_parser(__doc__, layers=2, repeats=15)
    parser.add_argument("--train", action="store_true", help="time forward+backward instead of forward")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    block = LEGOBlock(args.dim, args.heads, args.layers, max_seq_len=args.seq)
    block.attach_head(torch.nn.Linear(args.dim, 8, bias=False))
    block.train(args.train)
    h = torch.randn(args.batch, args.seq, args.dim, requires_grad=args.train)
    gen = torch.Generator().manual_seed(0)
    masks = {share: random_mask(share, args.batch, args.seq, gen) for share in SHARES}
    masks[ALL_MASK] = torch.ones(args.batch, args.seq, dtype=torch.bool)
    points = [*SHARES, ALL_MASK]
    full, kv = block.layer_flops(args.seq)

    def run(share: float | str) -> None:
        active = None if share == 1.0 else masks[share]
        if args.train:
            block.run(h, active, logits_for="none").hidden.sum().backward()
        else:
            with torch.no_grad():
                block.run(h, active, logits_for="none")

    seconds = median_seconds(points, run, args.repeats)
    dense = seconds[1.0]
    rows = []
    mode = "forward+backward" if args.train else "forward"
    print(
        f"LEGOBlock {mode}: dim {args.dim}, {args.heads} heads, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'active':>7} {'ms':>8} {'ratio':>7} {'ideal':>7} {'ratio/ideal':>12}")
    for share in SHARES:
        ms = seconds[share] * 1e3
        ratio = ms / (dense * 1e3)
        ideal = share + (1 - share) * kv / full if share > 0 else 0.0
        over = ratio / ideal if ideal else float("nan")
        rows.append({"active": share, "ms": ms, "ratio": ratio, "ideal": ideal, "over_ideal": over})
        print(f"{share:>7.0%} {ms:>8.2f} {ratio:>7.3f} {ideal:>7.3f} {over:>12.3f}")
    mask_ratio = seconds[ALL_MASK] / dense
    rows.append({"active": ALL_MASK, "ratio": mask_ratio})
    print(f"{ALL_MASK}: {mask_ratio:.3f} x dense (active=None)")
    return rows


if __name__ == "__main__":
    main()
