"""Forward+backward wall time of an MoE feed-forward against the dense SwiGLU with the same active FLOPs.

At each width, three points are timed side by side, interleaved (experiments/bench_common.py), on the same
`(batch * seq, dim)` input: the dense SwiGLU of the model's default width, the MoE layer (8 experts, top-2,
each expert half the dense width, so a token's FFN FLOPs match the dense layer's plus the router) with its
experts computed by `torch._grouped_mm`, and the same layer with the per-expert loop. The ratios are medians
of per-round ratios: the MoE's routing, sort and scatter overhead over the dense layer (target <= 1.3x), and
the loop over grouped_mm. The router starts at the model's initialisation (near-uniform routing).

    python experiments/bench_moe.py                     # dims 256 (small) and 512, 2048 tokens
    python experiments/bench_moe.py --dims 32 --seq 16 --batch 2 --repeats 2   # smoke size
"""

from __future__ import annotations

import statistics

import torch

from experiments.bench_common import interleaved_seconds, per_round_ratios, size_parser
from lego.layers import SwiGLU, swiglu_hidden_dim
from lego.model import _init_weights
from lego.moe import MoEConfig, MoEFeedForward

TARGET = 1.3  # the bound on MoE over dense wall time at equal active FLOPs


def bench_width(dim: int, tokens: int, repeats: int, experts: int, top_k: int) -> dict:
    torch.manual_seed(0)
    hidden = swiglu_hidden_dim(dim)
    dense = SwiGLU(dim, hidden)
    moe = MoEFeedForward(dim, hidden, MoEConfig(num_experts=experts, top_k=top_k)).train()
    dense.apply(_init_weights), moe.apply(_init_weights)
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)

    def run(point: str) -> None:
        if point == "dense":
            dense(x).backward(grad)
            return
        moe.config.grouped_mm = point == "moe grouped_mm"
        out = moe(x)
        (out * grad).sum().add(moe.aux_loss).backward()
        moe.update_bias()  # clears the step's counts, as training does

    points = ["dense", "moe grouped_mm", "moe loop"]
    times = interleaved_seconds(points, run, repeats)
    dense_flops = 3 * 2 * dim * hidden  # per token: gate, up and down projections
    moe_flops = moe.token_flops()
    result = {
        "dim": dim, "tokens": tokens, "dense_hidden": hidden, "expert_hidden": moe.hidden_dim,
        "active_flops_ratio": moe_flops / dense_flops,
        "ffn_params_ratio": sum(p.numel() for p in moe.parameters()) / sum(p.numel() for p in dense.parameters()),
        "ms": {point: statistics.median(t) * 1e3 for point, t in times.items()},
        "grouped_vs_dense": statistics.median(per_round_ratios(times, "dense", "moe grouped_mm")),
        "loop_vs_dense": statistics.median(per_round_ratios(times, "dense", "moe loop")),
        "loop_vs_grouped": statistics.median(per_round_ratios(times, "moe grouped_mm", "moe loop")),
    }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = size_parser(__doc__, layers=1, repeats=30)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)
    tokens = args.batch * args.seq
    print(
        f"MoE FFN ({args.experts} experts, top-{args.top_k}) vs dense SwiGLU, forward+backward, {tokens} tokens, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds, medians"
    )
    results = []
    for dim in args.dims:
        r = bench_width(dim, tokens, args.repeats, args.experts, args.top_k)
        results.append(r)
        ms = r["ms"]
        print(
            f"dim {dim}: dense (FFN {r['dense_hidden']}) {ms['dense']:.2f} ms | MoE (experts of {r['expert_hidden']}, "
            f"{r['active_flops_ratio']:.2f}x the active FLOPs, {r['ffn_params_ratio']:.1f}x the parameters): "
            f"grouped_mm {ms['moe grouped_mm']:.2f} ms, loop {ms['moe loop']:.2f} ms"
        )
        verdict = "within" if r["grouped_vs_dense"] <= TARGET else "OVER"
        print(
            f"  MoE grouped_mm / dense: {r['grouped_vs_dense']:.2f}x ({verdict} the {TARGET}x target); "
            f"loop / dense: {r['loop_vs_dense']:.2f}x; loop / grouped_mm: {r['loop_vs_grouped']:.2f}x"
        )
    return results


if __name__ == "__main__":
    main()
