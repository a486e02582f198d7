"""The GPU benchmark (issue 23): LEGO's model code at a GPT-2-small shape on one CUDA device, against its targets.

Every section runs under bfloat16 autocast with float32 parameters, timed with CUDA events after warm-up
steps (the first of which compiles); "compiled" means `LEGOBlock.compile_layers(dynamic=False)` (each layer,
dense and sparse path; the sparse rows padded to multiples of 64, so few shapes compile) and, for the dense
step, the head and loss compiled too.

* dense training step (forward, backward, fused AdamW) of one 12-layer block with the tied head: tokens/s,
  model FLOPs utilisation (3x the forward FLOPs the model counts, over the device's dense bf16 peak from
  `lego.training.throughput`), peak memory; eager and compiled. Target: compiled MFU >= 45 %.
* sparse training step (a later block's: inputs without gradient, loss on the active tokens) at 50 % and 25 %
  active tokens against the dense step: wall-time ratio over its ideal, the forward-FLOP ratio
  (`LEGOBlock.forward_flops`: full work for active tokens, K/V for kept ones). Target <= 1.25x.
* early-exit inference (`LEGOTransformer.forward`, two blocks of 6 layers) with 50 % and 90 % of the tokens
  exiting at Block 0: wall-time ratio to full depth over the honest cost (`ExitStats.honest_cost`).
  Target <= 1.10x.
* MoE feed-forward (8 experts, top-2, half-width experts: the dense FFN's active FLOPs plus the router),
  forward and backward, `torch._grouped_mm` and the per-expert loop, against the dense SwiGLU.
  Target: grouped <= 1.3x dense.

It imports only LEGO's model code and torch (no hydra, wandb or datasets): a bare GPU machine runs it.
Results are printed, and written to OUT/bench_gpu.json and OUT/bench_gpu.md after every section, so a run
cut short keeps what it measured; `--budget-s` skips the sections that would start late.

    python experiments/bench_gpu.py --out DIR           # CUDA, GPT-2 small: dim 768, 12 x 12 heads, seq 1024
    python experiments/bench_gpu.py --smoke --out DIR   # a tiny shape on the CPU in seconds (not a measurement)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.bench_common import random_mask
from lego.layers import SwiGLU, swiglu_hidden_dim
from lego.model import LEGOBlock, LEGOTransformer, _init_weights
from lego.moe import MoEConfig, MoEFeedForward, grouped_mm_supported
from lego.training.throughput import peak_bf16_tflops

TARGETS = {  # (what, bound, "min" or "max")
    "dense_mfu": ("dense compiled MFU", 0.45, "min"),
    "sparse_over_ideal": ("sparse step / its ideal", 1.25, "max"),
    "exit_over_honest": ("early exit / its honest ideal", 1.10, "max"),
    "moe_over_dense": ("MoE grouped / dense SwiGLU", 1.3, "max"),
}
ACTIVE_SHARES = (0.5, 0.25)
EXIT_SHARES = (0.5, 0.9)


@dataclass(frozen=True)
class Shape:
    dim: int
    layers: int
    heads: int
    seq: int
    batch: int
    vocab: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


GPT2_SMALL = Shape(dim=768, layers=12, heads=12, seq=1024, batch=16, vocab=50304)
SMOKE = Shape(dim=32, layers=2, heads=2, seq=32, batch=2, vocab=64)


@dataclass
class Bench:
    """What every section shares: the device, the timer's step counts, the compile backend and the budget."""

    device: str
    shape: Shape
    warmup: int
    steps: int
    backend: str
    deadline: float

    def precision(self) -> AbstractContextManager:
        return torch.autocast(self.device, dtype=torch.bfloat16) if self.device == "cuda" else nullcontext()

    def seconds(self, fn: Callable[[], object]) -> float:
        """Median seconds of `fn()` over `steps` calls after `warmup` (CUDA events on the GPU)."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.steps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start_s)
        return statistics.median(times)

    def reset_memory(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None

    def compile(self, block: LEGOBlock) -> None:
        block.compile_layers(backend=self.backend, dynamic=False)

    def tokens(self, seed: int) -> Tensor:
        shape = (self.shape.batch, self.shape.seq)
        return torch.randint(0, self.shape.vocab, shape, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def mask(self, share: float, seed: int) -> Tensor:
        return random_mask(share, self.shape.batch, self.shape.seq, torch.Generator().manual_seed(seed)).to(self.device)


def _block(shape: Shape, layers: int, device: str) -> LEGOBlock:
    torch.manual_seed(0)
    block = LEGOBlock(shape.dim, shape.heads, layers, max_seq_len=shape.seq)
    block.apply(_init_weights)
    block.attach_head(nn.Linear(shape.dim, shape.vocab, bias=False))
    nn.init.normal_(block.head.weight, std=0.02)
    return block.to(device)


def lm_loss(hidden: Tensor, norm: nn.Module, head: nn.Linear, targets: Tensor) -> Tensor:
    """Cross-entropy of the head's logits (float32 for the softmax), the dense step's head and loss."""
    return F.cross_entropy(head(norm(hidden)).float().flatten(0, 1), targets.flatten())


# -- sections ----------------------------------------------------------------------------------------------------
def dense_training(bench: Bench, compiled: bool, peak: float | None) -> dict:
    """One training step of a full-depth block with a tied embedding and head, eager or compiled."""
    shape = bench.shape
    block = _block(shape, shape.layers, bench.device)
    embedding = nn.Embedding(shape.vocab, shape.dim).to(bench.device)
    block.head.weight = embedding.weight  # tied, as LEGOTransformer does
    params = list(block.parameters()) + [embedding.weight]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=bench.device == "cuda")
    loss_fn = lm_loss
    if compiled:
        bench.compile(block)
        loss_fn = torch.compile(lm_loss, backend=bench.backend, dynamic=False)
    x, y = bench.tokens(0), bench.tokens(1)

    def step() -> None:
        with bench.precision():
            out = block.run(embedding(x), None, logits_for="none")
            loss = loss_fn(out.hidden, block.norm_out, block.head, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bench.reset_memory()
    seconds = bench.seconds(step)
    flops = 3 * block.forward_flops(shape.tokens, shape.tokens, shape.seq, n_logits=shape.tokens)
    return {
        "mode": "compiled" if compiled else "eager", "ms": seconds * 1e3, "tokens_per_s": shape.tokens / seconds,
        "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gb": bench.peak_memory_gb(),
    }  # fmt: skip


def sparse_training(bench: Bench, compiled: bool) -> list[dict]:
    """A later block's training step (inputs without gradient, loss on the active tokens' logits) at each of
    `ACTIVE_SHARES` against the same step with every token active."""
    shape = bench.shape
    block = _block(shape, shape.layers, bench.device)
    block.head.requires_grad_(False)  # the shared head is Block 0's
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=bench.device == "cuda")
    if compiled:
        bench.compile(block)
    h = torch.randn(shape.batch, shape.seq, shape.dim, generator=torch.Generator().manual_seed(0)).to(bench.device)
    targets = bench.tokens(1).flatten()
    masks = {share: bench.mask(share, 2) for share in ACTIVE_SHARES}

    def step(active: Tensor | None) -> None:
        with bench.precision():
            out = block.run(h, active, logits_for="active")
            loss = F.cross_entropy(out.logits.float(), targets.index_select(0, out.logits_index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    dense = bench.seconds(lambda: step(None))
    dense_flops = block.forward_flops(shape.tokens, shape.tokens, shape.seq, n_logits=shape.tokens)
    rows = []
    for share, active in masks.items():
        n_active = int(active.sum())
        seconds = bench.seconds(lambda active=active: step(active))
        ideal = block.forward_flops(n_active, shape.tokens, shape.seq, n_logits=n_active) / dense_flops
        ratio = seconds / dense
        rows.append({"mode": "compiled" if compiled else "eager", "active": share, "ms": seconds * 1e3,
                     "dense_ms": dense * 1e3, "ratio": ratio, "ideal": ideal, "over_ideal": ratio / ideal})  # fmt: skip
    return rows


def early_exit(bench: Bench, compiled: bool) -> list[dict]:
    """Routed inference with `EXIT_SHARES` of the tokens exiting at Block 0, against full depth."""
    shape = bench.shape
    torch.manual_seed(0)
    blocks = [LEGOBlock(shape.dim, shape.heads, max(shape.layers // 2, 1), max_seq_len=shape.seq) for _ in range(2)]
    model = LEGOTransformer(shape.vocab, shape.dim, blocks).to(bench.device).eval()
    with torch.no_grad():  # random confidences would all sit near 0.5: spread them like a trained classifier's
        model.blocks[0].exit_classifier.weight.normal_(0, 1.0)
    if compiled:
        for block in model.blocks:
            bench.compile(block)
    x = bench.tokens(0)
    with torch.no_grad(), bench.precision():
        confidence = model.blocks[0].run(model.embedding(x), logits_for="none").confidence.float().flatten()
    order = confidence.sort().values

    def infer(threshold: float) -> None:
        model.blocks[0].threshold = threshold
        with torch.no_grad(), bench.precision():
            model(x)

    dense = bench.seconds(lambda: infer(float("inf")))
    rows = []
    for share in EXIT_SHARES:
        threshold = float(order[int(round((1 - share) * order.numel()))])
        seconds = bench.seconds(lambda threshold=threshold: infer(threshold))
        with torch.no_grad(), bench.precision():
            _, stats = model(x, return_stats=True)
        ratio = seconds / dense
        rows.append({"mode": "compiled" if compiled else "eager", "exit_share": stats.exit_rates[0],
                     "ms": seconds * 1e3, "dense_ms": dense * 1e3, "ratio": ratio, "honest_cost": stats.honest_cost,
                     "over_honest": ratio / stats.honest_cost})  # fmt: skip
    return rows


def moe(bench: Bench) -> dict:
    """Forward + backward of the MoE feed-forward (grouped_mm and loop) and the dense SwiGLU, eager."""
    shape = bench.shape
    torch.manual_seed(0)
    hidden = swiglu_hidden_dim(shape.dim)
    dense = SwiGLU(shape.dim, hidden)
    layer = MoEFeedForward(shape.dim, hidden, MoEConfig(num_experts=8, top_k=2)).train()
    dense.apply(_init_weights), layer.apply(_init_weights)
    dense, layer = dense.to(bench.device), layer.to(bench.device)
    x = torch.randn(shape.tokens, shape.dim, generator=torch.Generator().manual_seed(0)).to(bench.device)
    x.requires_grad_()
    grad = torch.randn(shape.tokens, shape.dim, generator=torch.Generator().manual_seed(1)).to(bench.device)

    def run(point: str) -> None:
        with bench.precision():
            if point == "dense":
                out = dense(x)
                aux = 0.0
            else:
                layer.config.grouped_mm = point == "grouped"
                out = layer(x)
                aux = layer.aux_loss
            loss = (out.float() * grad).sum() + aux
        loss.backward()
        layer.update_bias()  # clears the step's counts, as training does

    with bench.precision():
        grouped_runs = grouped_mm_supported(x, layer.experts.w_gate_up, layer.experts.w_down)
    ms = {point: bench.seconds(lambda point=point: run(point)) * 1e3 for point in ("dense", "grouped", "loop")}
    return {
        "experts": 8, "top_k": 2, "dense_hidden": hidden, "expert_hidden": layer.hidden_dim,
        "active_flops_ratio": layer.token_flops() / (3 * 2 * shape.dim * hidden), "grouped_mm_runs": grouped_runs,
        "ms": ms, "grouped_over_dense": ms["grouped"] / ms["dense"], "loop_over_dense": ms["loop"] / ms["dense"],
    }  # fmt: skip


# -- report ------------------------------------------------------------------------------------------------------
def verdicts(results: dict) -> list[dict]:
    """Each target against the compiled measurements (MoE: eager), one row per measured point."""
    rows = []

    def add(key: str, point: str, value: float | None) -> None:
        what, bound, kind = TARGETS[key]
        met = None if value is None else value >= bound if kind == "min" else value <= bound
        rows.append({"target": what, "point": point, "value": value, "bound": bound, "kind": kind, "met": met})

    for row in results.get("dense", []):
        if row.get("mode") == "compiled":
            add("dense_mfu", "compiled", row["mfu"])
    for row in results.get("sparse", []):
        if row.get("mode") == "compiled":
            add("sparse_over_ideal", f"{row['active']:.0%} active", row["over_ideal"])
    for row in results.get("early_exit", []):
        if row.get("mode") == "compiled":
            add("exit_over_honest", f"{row['exit_share']:.0%} exit", row["over_honest"])
    if "grouped_over_dense" in results.get("moe", {}):
        add("moe_over_dense", "8 experts, top-2", results["moe"]["grouped_over_dense"])
    return rows


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, the first column left-aligned and the others right, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(results: dict) -> str:
    """The results as markdown tables, with the targets and whether each was met."""
    meta = results["meta"]
    smoke = " (smoke run on a tiny shape: not a measurement)" if meta["smoke"] else ""
    shape = ", ".join(f"{key} {value}" for key, value in meta["shape"].items())
    lines = [f"GPU check benchmark: {meta['device']}, torch {meta['torch']}, {meta['date']}; {shape}{smoke}"]
    lines.append("")
    if results["dense"]:
        header = ["dense step", "ms", "tokens/s", "TFLOP/s", "MFU", "peak memory GB"]
        lines += _table(header, [
            [r["mode"], f"{r['ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}",
             _number(r["mfu"], percent=True), _number(r["peak_memory_gb"])]
            for r in results["dense"]
        ])  # fmt: skip
    for key, name, point, ideal, over in (
        ("sparse", "sparse step", "active", "ideal", "over_ideal"),
        ("early_exit", "early exit", "exit_share", "honest_cost", "over_honest"),
    ):
        if results[key]:
            header = [name, point.replace("_", " "), "ms", "full-depth ms", "ratio", ideal.replace("_", " ")]
            header.append("ratio / ideal")
            lines += _table(header, [
                [r["mode"], f"{r[point]:.0%}", f"{r['ms']:.2f}", f"{r['dense_ms']:.2f}", f"{r['ratio']:.3f}",
                 f"{r[ideal]:.3f}", f"{r[over]:.3f}"]
                for r in results[key]
            ])  # fmt: skip
    if results["moe"]:
        m = results["moe"]
        point = "8 experts, top-2" + ("" if m["grouped_mm_runs"] else " (no grouped_mm here: both run the loop)")
        header = ["MoE fwd+bwd", "dense SwiGLU ms", "grouped_mm ms", "loop ms", "grouped / dense", "loop / dense"]
        ms = [f"{m['ms'][point]:.2f}" for point in ("dense", "grouped", "loop")]
        lines += _table(header, [[point, *ms, f"{m['grouped_over_dense']:.3f}", f"{m['loop_over_dense']:.3f}"]])
    rows = []
    for v in results["targets"]:
        percent = v["target"].endswith("MFU")
        met = "unknown (no peak for this device)" if v["met"] is None else "yes" if v["met"] else "NO"
        sign = ">=" if v["kind"] == "min" else "<="
        bound = f"{sign} {_number(v['bound'], percent)}"
        rows.append([v["target"], v["point"], _number(v["value"], percent), bound, met])
    lines += _table(["target", "point", "value", "bound", "met"], rows)
    lines += [f"{section}: {error}" for section, error in results["errors"].items()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _write(results: dict, out: Path | None) -> None:
    results["targets"] = verdicts(results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "bench_gpu.md").write_text(markdown(results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, 2 steps: runs in seconds")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no section after this many seconds")
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; --smoke runs a tiny shape on the CPU")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(1)  # a tiny shape gains nothing from threads, and loses much on a busy machine
    # every shape and grad mode of every section compiles once (the limit's name before torch 2.6: cache_size_limit)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)
    bench = Bench(device, SMOKE if args.smoke else GPT2_SMALL, warmup=1 if args.smoke else 3,
                  steps=2 if args.smoke else args.steps, backend="eager" if args.smoke else "inductor",
                  deadline=time.monotonic() + args.budget_s)  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_bf16_tflops(name) if device == "cuda" else None
    results: dict = {
        "meta": {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
                 "shape": asdict(bench.shape), "peak_bf16_tflops": peak, "steps": bench.steps},
        "dense": [], "sparse": [], "early_exit": [], "moe": {}, "errors": {},
    }  # fmt: skip
    sections: list[tuple[str, Callable[[], object]]] = [
        ("dense", lambda: dense_training(bench, False, peak)),
        ("dense", lambda: dense_training(bench, True, peak)),
        ("sparse", lambda: sparse_training(bench, True)),
        ("early_exit", lambda: early_exit(bench, True)),
        ("moe", lambda: moe(bench)),
        ("sparse", lambda: sparse_training(bench, False)),
        ("early_exit", lambda: early_exit(bench, False)),
    ]
    print(f"bench_gpu on {name}, torch {torch.__version__}, shape {asdict(bench.shape)}", flush=True)
    for i, (section, run) in enumerate(sections):
        label = f"{section} #{i}"
        if time.monotonic() > bench.deadline:
            results["errors"][label] = "skipped: out of the time budget"
            continue
        start = time.monotonic()
        try:
            value = run()
        except Exception as exc:  # one failed section is reported; the others still run
            results["errors"][label] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{label} failed: {results['errors'][label]}", flush=True)
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        if isinstance(value, dict) and section == "moe":
            results["moe"] = value
        else:
            results[section] += value if isinstance(value, list) else [value]
        print(f"{label} done in {time.monotonic() - start:.0f} s", flush=True)
        _write(results, args.out)
    _write(results, args.out)
    print(markdown(results))
    met = [v["met"] for v in results["targets"]]
    print(f"targets met: {sum(m is True for m in met)} of {len(met)}"
          + (f" ({sum(m is None for m in met)} unknown)" if None in met else "")
          + ("; smoke run on the CPU: not a measurement" if args.smoke else ""))  # fmt: skip
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
