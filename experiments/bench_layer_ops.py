"""Forward+backward wall time of the elementwise parts of a LEGO layer, against what autograd does alone.

`lego.layers.RMSNorm` computes its CPU backward with LayerNorm's fused kernel, and the SwiGLU product
writes its gradient into one buffer. Each is timed side by side, interleaved, with the plain formula under
autograd (and `nn.LayerNorm`, the peer's norm, for scale) on a `(batch * seq, width)` input; speed-ups
are medians of per-round ratios. Not a target of its own: it shows where the dense stack's time went
(`bench_dense_peer.py` is the target).

    python experiments/bench_layer_ops.py                  # 2048 tokens, dim 512, FFN 1368
    python experiments/bench_layer_ops.py --dim 32 --seq 16 --batch 2 --repeats 2     # smoke size
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from experiments.bench_common import interleaved_seconds, per_round_ratios, size_parser
from experiments.bench_dense_peer import peer_equal_hidden_dim
from lego.layers import RMSNorm, swiglu


def _plain_swiglu_product(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def main(argv: list[str] | None = None) -> dict:
    args = size_parser(__doc__, layers=1, repeats=40).parse_args(argv)
    torch.manual_seed(0)
    tokens = args.batch * args.seq
    hidden = peer_equal_hidden_dim(args.dim)  # bench_dense_peer's FFN width
    x = torch.randn(tokens, args.dim, requires_grad=True)
    gate_up = torch.randn(tokens, 2 * hidden, requires_grad=True)
    grad_x, grad_h = torch.randn(tokens, args.dim), torch.randn(tokens, hidden)
    norms = {
        "RMSNorm (lego)": RMSNorm(args.dim),
        "nn.RMSNorm": nn.RMSNorm(args.dim),
        "nn.LayerNorm": nn.LayerNorm(args.dim),
    }
    products = {
        "SwiGLU product (lego)": swiglu,
        "silu(gate) * up": _plain_swiglu_product,
    }
    # Two groups, timed apart: in one round robin, the big SwiGLU buffers would evict the norms' input
    # from the cache right before whichever norm comes first in the round.
    times = interleaved_seconds(norms, lambda name: norms[name](x).backward(grad_x), args.repeats)
    times |= interleaved_seconds(products, lambda name: products[name](gate_up).backward(grad_h), args.repeats)
    print(
        f"forward+backward, {tokens} tokens, dim {args.dim}, FFN {hidden}, {torch.get_num_threads()} threads, "
        f"{args.repeats} rounds"
    )
    for name, t in times.items():
        print(f"{name:>22}: {statistics.median(t) * 1e3:8.3f} ms")

    def speedup(ours: str, plain: str) -> float:
        return statistics.median(per_round_ratios(times, ours, plain))

    result = {
        "rmsnorm_speedup": speedup("RMSNorm (lego)", "nn.RMSNorm"),
        "rmsnorm_vs_layernorm": speedup("RMSNorm (lego)", "nn.LayerNorm"),
        "swiglu_speedup": speedup("SwiGLU product (lego)", "silu(gate) * up"),
    }
    print(
        f"RMSNorm: lego {result['rmsnorm_speedup']:.2f}x as fast as nn.RMSNorm, "
        f"{result['rmsnorm_vs_layernorm']:.2f}x as fast as nn.LayerNorm"
    )
    print(f"SwiGLU product: lego {result['swiglu_speedup']:.2f}x as fast as autograd's")
    return result


if __name__ == "__main__":
    main()
