"""TRUE early exit at inference: wall time of `LEGOTransformer.forward` as a ratio to the dense forward.

Thresholds are set so that 0/25/50/75/90 % of the tokens exit at Block 0; each point is timed side by
side with the dense forward (interleaved, median of repeats) and printed next to `compute_cost` (the
original metric) and `honest_cost` (FLOPs really done: K/V of kept tokens and the head included).
Target: measured ratio <= 1.10 x honest_cost at every point.

    python experiments/bench_inference.py                 # dim 512, 8 heads, 2 blocks x 2 layers, seq 256, batch 8
    python experiments/bench_inference.py --dim 64 --seq 32 --batch 2 --repeats 2    # smoke size
"""

from __future__ import annotations

import argparse

import torch

from experiments.bench_common import median_seconds, size_parser
from lego import LEGOConfig, LEGOTransformer

SHARES = (0.0, 0.25, 0.5, 0.75, 0.9)
TARGET = 1.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = size_parser(__doc__, layers=2, repeats=10, vocab=True)
    parser.add_argument("--blocks", type=int, default=2, help="blocks of --layers layers each")
    return parser.parse_args(argv)


def exit_threshold(model: LEGOTransformer, x: torch.Tensor, share: float) -> float:
    """Block 0's threshold at which `share` of these tokens exit there."""
    if share == 0.0:
        return float("inf")
    with torch.no_grad():
        confidence = model.blocks[0].run(model.embedding(x), logits_for="none").confidence.flatten()
    return float(confidence.sort().values[int(round((1 - share) * confidence.numel()))])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = LEGOConfig(args.vocab, args.dim, args.heads, [args.layers] * args.blocks, max_seq_len=args.seq)
    model = LEGOTransformer.from_config(config).eval()
    with torch.no_grad():  # random confidences would all sit near 0.5: spread them like a trained classifier's
        model.blocks[0].exit_classifier.weight.normal_(0, 1.0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    thresholds = {share: exit_threshold(model, x, share) for share in SHARES}

    def run(point: float | str) -> None:
        model.blocks[0].threshold = float("inf") if point == "dense" else thresholds[point]
        with torch.no_grad():
            model(x)

    seconds = median_seconds(["dense", *SHARES], run, args.repeats)
    dense = seconds["dense"]

    print(
        f"LEGOTransformer.forward: dim {args.dim}, {args.heads} heads, {args.blocks} blocks x {args.layers} layers, "
        f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'exit@0':>7} {'ms':>8} {'ratio':>7} {'compute_cost':>13} {'honest_cost':>12} {'ratio/honest':>13}")
    rows = []
    for share in SHARES:
        model.blocks[0].threshold = thresholds[share]
        with torch.no_grad():
            _, stats = model(x, return_stats=True)
        ms = seconds[share] * 1e3
        ratio = ms / (dense * 1e3)
        over = ratio / stats.honest_cost
        rows.append(
            {
                "exit_share": stats.exit_rates[0],
                "ratio": ratio,
                "compute_cost": stats.compute_cost,
                "honest_cost": stats.honest_cost,
                "over_honest": over,
            }
        )
        flag = "" if over <= TARGET else f"  > {TARGET}"
        print(
            f"{stats.exit_rates[0]:>7.0%} {ms:>8.2f} {ratio:>7.3f} {stats.compute_cost:>13.3f} "
            f"{stats.honest_cost:>12.3f} {over:>13.3f}{flag}"
        )
    return rows


if __name__ == "__main__":
    main()
