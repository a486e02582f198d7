"""The model-level checks of the GPU path (issue 23), runnable without pytest: every check is a plain function
of the device, run by `tests/model/test_device_checks.py` (CPU always, CUDA when there is one) and by
`python experiments/gpu_check.py` on a bare GPU machine (torch, numpy and safetensors only; `scripts/gpu_check.sh`).

On CUDA everything runs under bfloat16 autocast and compares at bfloat16 tolerance (relative error of the
whole tensor); on the CPU in float32 at float32 tolerance. What is compared:

* the device-neutral ops (F.rms_norm, the plain SwiGLU product, the real-valued RoPE) against float64 formulas;
* a one-layer block's sparse path against its dense path (SDPA and FlexAttention, padded and not), outputs and
  every gradient: with one layer an active token's output is exactly the dense one;
* causality and kept tokens returned unchanged, through the padded sparse path;
* torch.compile'd layers against eager ones, dense and sparse;
* MoE: `torch._grouped_mm` (on CUDA in bfloat16, groups aligned) against the per-expert loop;
* routed early exit: an exiting token's logits are its block's.

    python experiments/gpu_check.py --out DIR            # on CUDA; writes DIR/checks.json
    python experiments/gpu_check.py --device cpu         # the same checks on the CPU
    python experiments/gpu_check.py --device cpu --checks check_moe_grouped_equals_loop   # one of them
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego.layers import RMSNorm, apply_rope, cpu_kernel, flex_attention_available, swiglu
from lego.model import LEGOBlock, LEGOTransformer
from lego.moe import MoEConfig, MoEFeedForward, grouped_mm_supported

DIM, HEADS, SEQ, BATCH, VOCAB = 128, 4, 80, 3, 96  # head_dim 32: FlexAttention's kernels want >= 16
BUCKET = 16  # the padding multiple the checks force (the default, 64, would pad these tiny masks to everything)
TOLERANCE = {"cpu": 2e-5, "cuda": 3e-2}  # relative error of a whole tensor: float32, bfloat16


def precision(device: str) -> AbstractContextManager:
    """bfloat16 autocast on CUDA (how the GPU path runs), float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def assert_near(got: Tensor, want: Tensor, device: str, what: str, scale: float = 1.0) -> None:
    """|got - want| / |want| (whole-tensor norms) within the device's tolerance, times `scale`."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert error <= TOLERANCE[device] * scale, f"{what}: relative error {error:.2e} > {TOLERANCE[device] * scale:.1e}"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block(device: str, layers: int = 1, seed: int = 0) -> LEGOBlock:
    torch.manual_seed(seed)
    block = LEGOBlock(DIM, HEADS, layers, max_seq_len=SEQ)
    block.attach_head(nn.Linear(DIM, VOCAB, bias=False))
    with torch.no_grad():  # a trained-looking norm, not all ones
        for norm in (module for module in block.modules() if isinstance(module, RMSNorm)):
            norm.weight.uniform_(0.5, 1.5)
    return block.to(device)


def _inputs(device: str, share: float = 0.4, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Hidden states (batch, seq, dim) and a random active mask with about `share` of the tokens."""
    h = torch.randn(BATCH, SEQ, DIM, generator=_generator(seed))
    active = torch.rand(BATCH, SEQ, generator=_generator(seed + 1)) < share
    return h.to(device), active.to(device)


def _attentions() -> list[str]:
    return ["sdpa", "flex"] if flex_attention_available() else ["sdpa"]


def _grads(loss: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


def _assert_grads_near(got: list, want: list, device: str, what: str, scale: float = 2.0) -> None:
    """Gradients pairwise near (a gradient is None on both sides for a tensor the loss does not use)."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), f"{what}: gradient {i} is None on one side only"
        if w is not None:
            assert_near(g, w, device, f"{what}: gradient {i}", scale)


def _logit_loss(logits: Tensor) -> Tensor:
    return logits.float().logsumexp(dim=-1).sum()


# -- the checks --------------------------------------------------------------------------------------------------
def check_ops_match_formulas(device: str) -> None:
    """RMSNorm, the SwiGLU product and RoPE match their float64 formulas (RMSNorm with gradients): off the CPU
    the plain ops (`cpu_kernel` false), on it the CPU kernels."""
    x = torch.randn(BATCH, SEQ, DIM, generator=_generator(0)).to(device).requires_grad_()
    assert cpu_kernel(x) == (device == "cpu")
    norm = RMSNorm(DIM, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    want = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * w64
    got = norm(x)
    assert_near(got, want, device, "RMSNorm")
    grad = torch.randn_like(want)
    for g, w, what in zip(_grads((got * grad).sum(), [x, norm.weight]), _grads((want * grad).sum(), [x64, w64]),
                          ("RMSNorm input gradient", "RMSNorm weight gradient"), strict=True):  # fmt: skip
        assert_near(g, w, device, what)

    gate, up = x64.detach().chunk(2, dim=-1)
    assert_near(swiglu(x.detach()), F.silu(gate) * up, device, "SwiGLU product")

    head_dim = DIM // HEADS
    q = x.detach().view(BATCH, SEQ, HEADS, head_dim)
    angles = torch.outer(torch.arange(SEQ, dtype=torch.float64), torch.rand(head_dim // 2, dtype=torch.float64))
    pairs = torch.view_as_complex(q.double().cpu().unflatten(-1, (-1, 2)))
    want = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles).unsqueeze(-2)).flatten(-2)
    got = apply_rope(q, angles.cos().float().to(device), angles.sin().float().to(device))
    assert_near(got.cpu(), want, device, "RoPE")


def check_sparse_layer_equals_dense(device: str) -> None:
    """A one-layer block: each active token's output, logits and every gradient (parameters and all hidden
    states, kept ones too through their keys and values) equal the dense path's; kept tokens come back
    bit-identical. For each attention kernel, padded and not."""
    h, active = _inputs(device)
    flat = active.reshape(-1).nonzero().squeeze(1)
    block = _block(device)
    params = list(block.parameters()) + [block.head.weight]
    h_dense = h.clone().requires_grad_()
    with precision(device):
        dense = block.run(h_dense, None, logits_for="active")
    dense_grads = _grads(_logit_loss(dense.logits.index_select(0, flat)), [h_dense, *params])
    for attention in _attentions():
        for bucket in (1, BUCKET):
            block.sparse_attention, block.sparse_bucket = attention, bucket
            what = f"{attention}, bucket {bucket}"
            backward = not (device == "cpu" and attention == "flex")  # FlexAttention has no CPU backward
            h_sparse = h.clone().requires_grad_(backward)
            with precision(device), torch.set_grad_enabled(backward):
                sparse = block.run(h_sparse, active, logits_for="active")
            assert torch.equal(sparse.hidden[~active], h[~active]), f"{what}: a kept token changed"
            assert_near(sparse.hidden[active], dense.hidden[active], device, f"{what}: active outputs")
            assert_near(sparse.logits, dense.logits.index_select(0, flat), device, f"{what}: logits")
            if backward:  # gradient 0: the hidden states
                _assert_grads_near(_grads(_logit_loss(sparse.logits), [h_sparse, *params]), dense_grads, device, what)


@torch.no_grad()
def check_causal_and_kept_tokens(device: str) -> None:
    """Through a padded two-layer sparse path: changing every state after position t changes nothing at or
    before t, and kept tokens are returned bit-identical."""
    h, active = _inputs(device, share=0.5)
    block = _block(device, layers=2)
    block.sparse_bucket = BUCKET
    t = SEQ // 2
    h_later = h.clone()
    h_later[:, t + 1 :] += torch.randn(BATCH, SEQ - t - 1, DIM, generator=_generator(5)).to(device)
    with precision(device):
        out, out_later = block.run(h, active), block.run(h_later, active)
    assert torch.equal(out.hidden[~active], h[~active]), "a kept token changed"
    assert_near(out_later.hidden[:, : t + 1], out.hidden[:, : t + 1], device, "states up to t", scale=0.1)
    assert torch.equal(out.should_exit[:, : t + 1], out_later.should_exit[:, : t + 1]), "exits up to t changed"


def check_padding_keeps_outputs(device: str) -> None:
    """Padding the sparse rows to a bucket changes no active token's state, logit or gradient (the device's
    own attention kernel: FlexAttention on CUDA)."""
    h, active = _inputs(device, share=0.3)
    block = _block(device, layers=2)
    params = list(block.parameters())
    results = []
    for bucket in (1, BUCKET):
        block.sparse_bucket = bucket
        with precision(device):
            out = block.run(h, active, logits_for="active")
        results.append((out, _grads(_logit_loss(out.logits), params)))
    (plain, plain_grads), (padded, padded_grads) = results
    assert len(block.sparse_layout(active).gather_index) % BUCKET == 0
    assert torch.equal(padded.hidden[~active], h[~active]), "a kept token changed"
    assert_near(padded.hidden, plain.hidden, device, "states")
    assert_near(padded.logits, plain.logits, device, "logits")
    _assert_grads_near(padded_grads, plain_grads, device, "parameters", scale=1.0)


def check_compiled_layers_equal_eager(device: str) -> None:
    """`compile_layers` (inductor on CUDA; on the CPU aot_eager, which traces forward and backward just as
    fast) gives the eager block's states and gradients, dense and padded sparse."""
    h, active = _inputs(device, share=0.5)
    eager = _block(device, layers=2)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend="inductor" if device == "cuda" else "aot_eager", dynamic=False)
    for block in (eager, compiled):
        block.sparse_bucket = BUCKET
    for mask in (None, active):
        what = "dense" if mask is None else "sparse"
        results = []
        for block in (eager, compiled):
            with precision(device):
                out = block.run(h, mask, logits_for="active")
            results.append((out, _grads(_logit_loss(out.logits), list(block.parameters()))))
        (want, want_grads), (got, got_grads) = results
        assert_near(got.hidden, want.hidden, device, f"{what}: states")
        assert_near(got.logits, want.logits, device, f"{what}: logits")
        _assert_grads_near(got_grads, want_grads, device, f"{what}: parameters")


def check_moe_grouped_equals_loop(device: str) -> None:
    """The grouped experts (on CUDA: bfloat16 `torch._grouped_mm`, groups aligned) against the per-expert loop,
    output and every gradient, with three experts that get no token."""
    torch.manual_seed(0)
    moe = MoEFeedForward(DIM, 4 * DIM, MoEConfig(num_experts=8, top_k=2, balance="bias")).to(device).train()
    moe.expert_bias[-3:] = -100.0
    x = torch.randn(BATCH * SEQ, DIM, generator=_generator(2)).to(device).requires_grad_()
    results = []
    for grouped in (True, False):
        moe.config.grouped_mm = grouped
        with precision(device):
            assert not grouped or grouped_mm_supported(x, moe.experts.w_gate_up, moe.experts.w_down), "no grouped_mm"
            out = moe(x)
            loss = (out.float() * torch.linspace(-1, 1, DIM, device=device)).sum() + moe.aux_loss
        assert float(moe.stats.load[-3:].sum()) == 0
        results.append((out, _grads(loss, [x, *moe.parameters()])))
    (grouped_out, grouped_grads), (loop_out, loop_grads) = results
    assert_near(grouped_out, loop_out, device, "output")
    _assert_grads_near(grouped_grads, loop_grads, device, "input and parameters", scale=1.0)


@torch.no_grad()
def check_early_exit_logits_are_the_blocks(device: str) -> None:
    """Routed inference with about half the tokens exiting at Block 0: an exiting token's logits are Block 0's,
    the others' come from Block 1's sparse path, and the honest cost is below 1."""
    torch.manual_seed(0)
    blocks = [LEGOBlock(DIM, HEADS, 1, max_seq_len=SEQ) for _ in range(2)]
    model = LEGOTransformer(VOCAB, DIM, blocks).to(device).eval()
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=_generator(3)).to(device)
    with precision(device):
        first = model.blocks[0].run(model.embedding(x), logits_for="active")
        model.blocks[0].threshold = float(first.confidence.float().flatten().median())
        logits, stats = model(x, return_stats=True)
    exited = stats.exit_block.reshape(-1) == 0
    assert 0 < int(exited.sum()) < x.numel(), "no routing happened"
    assert_near(logits.reshape(-1, VOCAB)[exited], first.logits[exited], device, "exited tokens' logits")
    assert 0 < stats.honest_cost < 1


CHECKS: list[Callable[[str], None]] = [
    check_ops_match_formulas,
    check_sparse_layer_equals_dense,
    check_causal_and_kept_tokens,
    check_padding_keeps_outputs,
    check_compiled_layers_equal_eager,
    check_moe_grouped_equals_loop,
    check_early_exit_logits_are_the_blocks,
]


def run_checks(device: str, names: list[str] | None = None) -> list[dict]:
    """The checks (all, or those `names` names), each timed, a failure recorded with its message (the others
    still run)."""
    rows = []
    for check in (c for c in CHECKS if names is None or c.__name__ in names):
        start = time.perf_counter()
        try:
            check(device)
            error = None
        except Exception as exc:  # a failed check is a result to report, not the end of the run
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        rows.append({"check": check.__name__, "passed": error is None, "error": error,
                     "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
        print(f"{'PASS' if error is None else 'FAIL'} {check.__name__} ({rows[-1]['seconds']} s)"
              + (f": {error}" if error else ""), flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, help="folder for checks.json")
    parser.add_argument("--checks", nargs="+", choices=[check.__name__ for check in CHECKS], help="default: all")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); --device cpu runs the checks on the CPU")
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"model checks on {name}, torch {torch.__version__}", flush=True)
    rows = run_checks(args.device, args.checks)
    passed = sum(row["passed"] for row in rows)
    print(f"{passed} of {len(rows)} checks passed")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"device": name, "torch": torch.__version__, "checks": rows}
        (args.out / "checks.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
