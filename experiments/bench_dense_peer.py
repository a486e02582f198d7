"""Dense throughput against a peer: forward+backward tokens/s of LEGO's layer stack vs
`torch.nn.TransformerEncoderLayer` (pre-norm, causal mask, no dropout) at the same sizes.

Both stacks have the same width, depth and parameter count (within 0.3 %): the peer's GELU MLP is 4*dim
wide, ours is a SwiGLU of 2/3 of that (rounded to a multiple of 8) with three matrices. (LEGO's default
FFN rounds up to a multiple of 64 instead, +3 % FFN work at dim 512.) Timed side by side, interleaved:
each round times one step of each stack, and the ratio is taken within the round, so a slow spell of a
shared machine hits both sides of it. The result is the median of the per-round ratios, with their
quartiles. Target: ours no slower (median ratio >= 1.0).

    python experiments/bench_dense_peer.py                 # dim 512, 8 heads, 4 layers, seq 256, batch 8
    python experiments/bench_dense_peer.py --compile       # both stacks through torch.compile
    python experiments/bench_dense_peer.py --dim 64 --seq 32 --batch 2 --repeats 2     # smoke size
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from experiments.bench_common import interleaved_seconds, per_round_ratios, size_parser
from lego import LEGOBlock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = size_parser(__doc__, layers=4, repeats=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile both stacks")
    return parser.parse_args(argv)


class PeerStack(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, mask=self.mask, is_causal=True)


def peer_equal_hidden_dim(dim: int) -> int:
    """The SwiGLU width (a multiple of 8) whose three matrices hold what the peer's 4*dim GELU MLP holds."""
    return 8 * round(2 * 4 * dim / 3 / 8)


class LegoStack(nn.Module):
    """One LEGOBlock's layers, run dense (every token active), without its exit classifier and head."""

    def __init__(self, dim: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.block = LEGOBlock(dim, heads, layers, hidden_dim=peer_equal_hidden_dim(dim), max_seq_len=seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block.layers:
            x = layer(x, self.block.rope)
        return x


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    stacks = {
        "lego": LegoStack(args.dim, args.heads, args.layers, args.seq),
        "nn.TransformerEncoderLayer": PeerStack(args.dim, args.heads, args.layers, args.seq),
    }
    params = {name: sum(p.numel() for p in stack.parameters()) for name, stack in stacks.items()}
    if args.compile:
        stacks = {name: torch.compile(stack) for name, stack in stacks.items()}
    x = torch.randn(args.batch, args.seq, args.dim)

    def step(name: str) -> None:
        stacks[name](x).square().mean().backward()

    first_call = {}
    for name in stacks:  # the first call also compiles: what a training run pays once per new input shape
        start = time.perf_counter()
        step(name)
        first_call[name] = time.perf_counter() - start
    times = interleaved_seconds(stacks, step, args.repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * args.seq
    rate = {name: tokens / t for name, t in seconds.items()}
    print(
        f"forward+backward, dim {args.dim}, {args.heads} heads, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}, compile={args.compile}, {torch.get_num_threads()} threads, {args.repeats} rounds"
    )
    for name in stacks:
        print(
            f"{name:>28}: {rate[name]:>10,.0f} tokens/s  ({params[name] / 1e6:.2f}M params; "
            f"first call {first_call[name]:.2f} s, then a median {seconds[name]:.3f} s per step)"
        )
    per_round = per_round_ratios(times, "lego", "nn.TransformerEncoderLayer")
    ratio = statistics.median(per_round)
    low, _, high = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else (ratio, ratio, ratio)
    rounds = len(per_round)
    print(f"lego / peer throughput: {ratio:.3f}, quartiles {low:.3f}-{high:.3f} over {rounds} rounds (target >= 1.0)")
    return {"rates": rate, "ratio": ratio, "ratio_quartiles": (low, high), "first_call_seconds": first_call}


if __name__ == "__main__":
    main()
