"""Mixture-of-Experts feed-forward: a drop-in replacement for a layer's SwiGLU (token-choice top-k routing).

Each token's router scores (softmax or sigmoid of `router(x)`) pick its `top_k` routed experts; the token's
output is the score-weighted sum of those experts' SwiGLU outputs, plus the output of the shared expert(s)
every token goes through. The style follows torchtitan's `models/moe`:

* Experts are SwiGLUs whose weights are stacked `(experts, in, out)` tensors (`GroupedExperts`). Tokens are
  sorted by expert and computed with two `torch._grouped_mm` calls (one matrix multiply per expert, one
  kernel launch), or with a plain per-expert loop, the reference and the fallback wherever grouped_mm
  cannot run: float64, widths whose rows are not a multiple of 16 bytes (it requires that), or on CUDA
  anything but bfloat16 (float32 under bfloat16 autocast is cast to it, as autocast casts a linear; the op
  has no autocast kernel). On CUDA each expert's rows start at a multiple of 16 bytes' worth of rows (8 in
  bfloat16): the weight gradient contracts over the rows, group by group, and its kernel needs aligned groups.
* Load balancing, `MoEConfig.balance`:
  - "aux_loss": the Switch/OLMoE auxiliary loss `E * sum_e f_e * P_e` (share of routed slots `f`, mean
    normalized score `P`), which the trainer adds to its loss through `aux_loss`;
  - "bias": DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, added to the scores for the
    top-k *choice* only (never to the weights), moved after every optimizer step by `update_bias()`
    toward the experts that got fewer tokens. It is a buffer, outside autograd and the optimizer, saved
    with the weights (a resumed run keeps balancing from where it was);
  - "none".
  The router z-loss (`mean(logsumexp(logits)^2)`, ST-MoE), which keeps router logits small, is added to
  `aux_loss` whenever `z_loss_weight > 0`, whatever the balancing method.
* No token is dropped unless `capacity_factor` is set: then each expert takes at most
  `ceil(capacity_factor * tokens * top_k / experts)` of its routed slots (the earliest tokens first) and
  the dropped share is reported in `stats`.

The module routes exactly the tokens it is given: in a LEGO block's sparse path those are the active
tokens only, so kept tokens are never routed, never counted in the load and never change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lego import distributed
from lego.layers import SwiGLU, swiglu

ScoreFunc = Literal["softmax", "sigmoid"]
Balance = Literal["aux_loss", "bias", "none"]
MoELayers = Literal["all", "later_blocks", "every_other"]
SCORE_FUNCS = ("softmax", "sigmoid")
BALANCES = ("aux_loss", "bias", "none")
MOE_LAYERS = ("all", "later_blocks", "every_other")


@dataclass
class MoEConfig:
    """What an MoE feed-forward looks like and which layers of a `LEGOTransformer` get one.

    `expert_hidden_dim` None: the dense SwiGLU width divided over the `top_k + shared_experts` experts a
    token runs through (rounded to a multiple of 8), so a token's FFN FLOPs match the dense layer's
    (plus the router) and the layer holds `(num_experts + shared_experts) / (top_k + shared_experts)`
    times the dense FFN's parameters.
    `layers`: "all" (every layer), "later_blocks" (every layer of Block 1 on; Block 0 stays dense), or
    "every_other" (every second layer of the whole stack, counting from the second).
    """

    num_experts: int = 8
    top_k: int = 2
    shared_experts: int = 0
    expert_hidden_dim: int | None = None
    score_func: ScoreFunc = "softmax"
    route_norm: bool = False  # renormalize the top-k scores to sum to 1 (DeepSeek-V3 does with sigmoid)
    balance: Balance = "aux_loss"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_update_rate: float = 0.001  # per-step bias change of balance="bias" (DeepSeek-V3's gamma)
    capacity_factor: float | None = None  # None: no token is ever dropped
    layers: MoELayers = "all"
    grouped_mm: bool = True  # False: always the per-expert loop (the reference)

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k ({self.top_k}) <= num_experts ({self.num_experts})")
        if self.shared_experts < 0:
            raise ValueError(f"shared_experts must be >= 0, got {self.shared_experts}")
        if self.expert_hidden_dim is not None and self.expert_hidden_dim < 1:
            raise ValueError(f"expert_hidden_dim must be positive or None, got {self.expert_hidden_dim}")
        for name, value, allowed in (
            ("score_func", self.score_func, SCORE_FUNCS), ("balance", self.balance, BALANCES),
            ("layers", self.layers, MOE_LAYERS),
        ):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if min(self.aux_loss_weight, self.z_loss_weight, self.bias_update_rate) < 0:
            raise ValueError("aux_loss_weight, z_loss_weight and bias_update_rate must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")

    def hidden_dim_for(self, dense_hidden_dim: int) -> int:
        """Each expert's SwiGLU width (see the class docstring)."""
        if self.expert_hidden_dim is not None:
            return self.expert_hidden_dim
        return max(8, 8 * round(dense_hidden_dim / (self.top_k + self.shared_experts) / 8))

    def uses_moe(self, block_index: int, layer_index: int) -> bool:
        """Whether layer `layer_index` (counted over the whole stack) of block `block_index` is an MoE one."""
        if self.layers == "later_blocks":
            return block_index > 0
        if self.layers == "every_other":
            return layer_index % 2 == 1
        return True


@dataclass
class MoEStats:
    """One forward's routing, over the tokens it routed (detached; `as_dict` for plain numbers)."""

    counts: Tensor  # (experts,) routed slots each expert computed (after the capacity cut)
    load: Tensor  # (experts,) share of the kept routed slots each expert computed
    imbalance: Tensor  # max / mean of the per-expert slot counts (1 = perfectly balanced)
    entropy: Tensor  # mean entropy (nats) of the tokens' normalized router scores, at most log(experts)
    dropped: Tensor  # share of routed slots over capacity (0 without a capacity factor)
    tokens: int

    def as_dict(self) -> dict:
        return {
            "load": self.load.tolist(), "imbalance": float(self.imbalance), "entropy": float(self.entropy),
            "dropped": float(self.dropped), "tokens": self.tokens,
        }  # fmt: skip


def grouped_mm_dtype(
    device_type: str, dtype: torch.dtype, autocast_dtype: torch.dtype | None = None
) -> torch.dtype | None:
    """The dtype `torch._grouped_mm` computes experts in for inputs of `dtype`, or None where it has no kernel
    (then the loop): on the CPU float32/bfloat16/float16 as they are; on CUDA bfloat16 only, which float32
    inputs become under bfloat16 autocast (`autocast_dtype`)."""
    if device_type == "cpu":
        return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    if device_type == "cuda":
        compute = autocast_dtype if dtype == torch.float32 and autocast_dtype is not None else dtype
        return compute if compute == torch.bfloat16 else None
    return None


def group_alignment(device_type: str, dtype: torch.dtype) -> int:
    """The row multiple each expert's group starts at: 16 bytes' worth on CUDA, 1 (no padding) on the CPU."""
    return 16 // dtype.itemsize if device_type == "cuda" else 1


def _grouped_dtype(x: Tensor, weights: tuple[Tensor, ...]) -> torch.dtype | None:
    """`grouped_mm_dtype` for these operands (autocast read from the current context), None when any row of
    an operand would not be a multiple of 16 bytes long (its stride requirement)."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if device == "cuda" and torch.is_autocast_enabled(device) else None
    dtype = grouped_mm_dtype(device, x.dtype, autocast)
    widths = [x.shape[-1], *(w.shape[-1] for w in weights), *(w.shape[-2] for w in weights)]
    if dtype is None or any(width * dtype.itemsize % 16 for width in widths):
        return None
    return dtype


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether `GroupedExperts` computes these operands with `torch._grouped_mm` (see `grouped_mm_dtype`)."""
    return _grouped_dtype(x, weights) is not None


def aligned_groups(counts: Tensor, n_rows: int, align: int) -> tuple[Tensor, Tensor, int]:
    """Groups of `counts[e]` rows (in order, `n_rows` in all) moved to start at multiples of `align` in a
    zero-padded buffer: (each row's index in it, the group end offsets as int32, the buffer's row count). The
    buffer holds n_rows + experts * (align - 1) rows, a bound known without a host sync; the last group runs
    to its end, so every row belongs to a group (the padding rows are zeros: they add nothing to a gradient)."""
    experts = len(counts)
    padded = (counts + align - 1) // align * align
    ends = padded.cumsum(0)
    shift = (ends - padded) - (counts.cumsum(0) - counts)  # each group's start in the buffer minus its start
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=counts.device), counts, output_size=n_rows)
    rows = torch.arange(n_rows, device=counts.device) + shift.index_select(0, expert_of_row)
    size = n_rows + experts * (align - 1)
    offsets = torch.cat([ends[:-1], ends.new_full((1,), size)]).to(torch.int32)
    return rows, offsets, size


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLUs with stacked weights: `w_gate_up` (experts, dim, 2*hidden) with the gate half
    first, as `SwiGLU.w_gate_up` transposed, and `w_down` (experts, hidden, dim)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim = num_experts, hidden_dim
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02), the model's initialisation of every linear weight."""
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02)

    def forward(self, x: Tensor, counts: Tensor, grouped: bool = True) -> Tensor:
        """x: (slots, dim) sorted by expert, `counts[e]` rows for expert e. Grouped matrix multiplies where
        supported and asked for, else the per-expert loop."""
        dtype = _grouped_dtype(x, (self.w_gate_up, self.w_down)) if grouped else None
        if dtype is None:
            return self.forward_loop(x, counts)
        return self.forward_grouped(x, counts, dtype, group_alignment(x.device.type, dtype))

    def forward_grouped(self, x: Tensor, counts: Tensor, dtype: torch.dtype | None = None, align: int = 1) -> Tensor:
        """Two `torch._grouped_mm` calls in `dtype` (default x's; operands cast to it), each expert's rows
        starting at a multiple of `align` (`aligned_groups`). The output is in `dtype`."""
        dtype = dtype or x.dtype
        x, w_gate_up, w_down = x.to(dtype), self.w_gate_up.to(dtype), self.w_down.to(dtype)
        rows = None
        if align == 1:
            offsets = counts.cumsum(0).to(torch.int32)
        else:
            rows, offsets, size = aligned_groups(counts, len(x), align)
            x = x.new_zeros(size, x.shape[-1]).index_copy(0, rows, x)
        out = torch._grouped_mm(swiglu(torch._grouped_mm(x, w_gate_up, offs=offsets)), w_down, offs=offsets)
        return out if rows is None else out.index_select(0, rows)

    def forward_loop(self, x: Tensor, counts: Tensor) -> Tensor:
        """One plain matrix multiply pair per expert that got tokens (the reference). `unbind`, not `w[e]`: the
        backward of each `w[e]` would fill a zero gradient the size of all experts' weights."""
        gate_up, down = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        outputs = [
            swiglu(part @ gate_up[e]) @ down[e] for e, part in enumerate(x.split(counts.tolist())) if part.shape[0]
        ]
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.w_down.shape[-1])


class MoEFeedForward(nn.Module):
    """Router + routed experts (+ shared experts): maps (..., dim) to (..., dim) like `SwiGLU`.

    After a forward: `stats` holds its routing statistics and `aux_loss` (with grad enabled) the weighted
    balancing + z-loss to add to the training loss, or None when both weights make it zero.
    In training mode the forward also adds its per-expert slot counts to `tokens_per_expert`, which
    `update_bias()` consumes.
    """

    def __init__(self, dim: int, dense_hidden_dim: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.hidden_dim = config.hidden_dim_for(dense_hidden_dim)
        self.router = nn.Linear(dim, config.num_experts, bias=False)
        self.experts = GroupedExperts(dim, self.hidden_dim, config.num_experts)
        self.shared = SwiGLU(dim, config.shared_experts * self.hidden_dim) if config.shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        # slot counts since the last update_bias(); not saved (a step's counts are consumed in that step)
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        self.stats: MoEStats | None = None
        self.aux_loss: Tensor | None = None

    def token_flops(self) -> float:
        """Forward FLOPs per routed token: the router, its top_k experts and the shared expert(s) (the active
        parameters only; the scatter, sort and score weighting are left out like the norms)."""
        expert = 2 * self.dim * 2 * self.hidden_dim + 2 * self.hidden_dim * self.dim
        return float(2 * self.dim * self.config.num_experts + (self.config.top_k + self.config.shared_experts) * expert)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        logits = self.router(x).float()  # scores in float32 under bf16 autocast too
        scores = logits.softmax(dim=-1) if self.config.score_func == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.config.balance == "bias" else scores
        expert_index = choice.topk(self.config.top_k, dim=-1).indices  # (tokens, top_k)
        weights = scores.gather(1, expert_index)
        if self.config.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)

        flat_expert = expert_index.reshape(-1)
        order = flat_expert.argsort(stable=True)  # slots grouped by expert, token order within an expert
        routed = torch.bincount(flat_expert, minlength=self.config.num_experts)
        counts = routed
        if self.config.capacity_factor is not None:
            order, counts = self._apply_capacity(order, routed, x.shape[0])
        token_of_slot = order // self.config.top_k
        out_sorted = self.experts(x.index_select(0, token_of_slot), counts, self.config.grouped_mm)
        out_sorted = out_sorted * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(x.dtype)
        out = x.new_zeros(x.shape).index_add(0, token_of_slot, out_sorted)
        if self.shared is not None:
            out = out + self.shared(x)

        self._record(logits, scores, routed, counts)
        return out.view(shape)

    def _apply_capacity(self, order: Tensor, routed: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
        """Keep at most `capacity` slots per expert, the earliest tokens' (the sort is stable)."""
        capacity = math.ceil(self.config.capacity_factor * n_tokens * self.config.top_k / self.config.num_experts)
        starts = routed.cumsum(0) - routed
        sorted_expert = torch.repeat_interleave(torch.arange(len(routed), device=routed.device), routed)
        rank_in_expert = torch.arange(len(order), device=order.device) - starts.index_select(0, sorted_expert)
        return order[rank_in_expert < capacity], routed.clamp(max=capacity)

    def _record(self, logits: Tensor, scores: Tensor, routed: Tensor, counts: Tensor) -> None:
        """Statistics, the auxiliary loss (with grad enabled) and, in training, the load for `update_bias`."""
        n_slots = scores.shape[0] * self.config.top_k
        probs = scores / scores.sum(dim=-1, keepdim=True)  # sigmoid scores normalized per token
        with torch.no_grad():
            load = counts.float()
            self.stats = MoEStats(
                counts=load,
                load=load / load.sum().clamp_min(1.0),
                imbalance=load.max() / load.mean().clamp_min(1e-20),
                entropy=-(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean(),
                dropped=1.0 - load.sum() / max(n_slots, 1),
                tokens=scores.shape[0],
            )
            if self.training:
                self.tokens_per_expert += load
        terms = []
        if torch.is_grad_enabled() and n_slots:
            if self.config.balance == "aux_loss" and self.config.aux_loss_weight > 0:
                slot_share = routed.float() / n_slots  # f_e: not differentiable, the router learns through P_e
                balance = self.config.num_experts * (slot_share * probs.mean(dim=0)).sum()
                terms.append(self.config.aux_loss_weight * balance)
            if self.config.z_loss_weight > 0:
                terms.append(self.config.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean())
        self.aux_loss = torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's aux-loss-free step: move each expert's bias by `bias_update_rate` toward the mean load
        (up when it got fewer slots than the mean, down when more), centred so the biases keep a zero mean.
        Consumes the counts accumulated since the last call (summed over ranks under torch.distributed, so
        every rank takes the same step); with another balancing method it only clears them."""
        counts = distributed.all_reduce_sum(self.tokens_per_expert.clone())
        self.tokens_per_expert.zero_()
        if self.config.balance != "bias" or not counts.sum():
            return
        delta = self.config.bias_update_rate * torch.sign(counts.mean() - counts)
        self.expert_bias += delta - delta.mean()


def step_routing_metrics(ffns: Iterable[MoEFeedForward]) -> dict[str, float]:
    """The last forward's routing, averaged over the MoE layers `ffns` (this rank's tokens): load imbalance
    (max / mean slots per expert, 1 = balanced) and the share of routed slots dropped over capacity; {} when
    none of them routed anything (a dense model)."""
    stats = [ffn.stats for ffn in ffns if ffn.stats is not None]
    if not stats:
        return {}
    return {
        "moe_imbalance": sum(float(s.imbalance) for s in stats) / len(stats),
        "moe_dropped": sum(float(s.dropped) for s in stats) / len(stats),
    }


class RoutingTally:
    """Routing statistics of named MoE feed-forwards summed over many forwards (forward hooks), e.g. a stage's
    training steps or a whole test pass: what one batch's `stats` cannot show.

    `training`: count only forwards in that mode (True: training steps, not the validations between them), or
    every forward (None). Use as a context manager; `summary()` gives one row per layer."""

    def __init__(self, ffns: dict[str, MoEFeedForward], training: bool | None = None) -> None:
        self.ffns, self.training = ffns, training
        self.counts = {name: torch.zeros(ffn.config.num_experts, dtype=torch.float64) for name, ffn in ffns.items()}
        self.sums = {name: torch.zeros(3, dtype=torch.float64) for name in ffns}  # tokens, entropy * tokens, slots
        self._hooks = [ffn.register_forward_hook(self._hook(name)) for name, ffn in ffns.items()]

    def _hook(self, name: str):
        def record(module: MoEFeedForward, _inputs, _output) -> None:
            if module.stats is None or (self.training is not None and module.training != self.training):
                return
            stats = module.stats
            self.counts[name] += stats.counts.detach().double().cpu()
            slots = stats.tokens * module.config.top_k
            entropy = float(stats.entropy) * stats.tokens
            self.sums[name] += torch.tensor([stats.tokens, entropy, slots], dtype=torch.float64)

        return record

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> RoutingTally:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, reduce: bool = False) -> list[dict]:
        """Per layer: `load` (share of the computed slots per expert), `imbalance` (max / mean slot count, 1 is
        balanced), `entropy` (mean router entropy in nats; `max_entropy` = log experts), `dropped` (share of
        routed slots over capacity) and `tokens` routed. `reduce`: sum over torch.distributed ranks first (every
        rank must call it)."""
        rows = []
        for name in self.ffns:
            counts, sums = self.counts[name], self.sums[name]
            if reduce:
                counts, sums = distributed.all_reduce_sum(counts.clone()), distributed.all_reduce_sum(sums.clone())
            tokens, entropy_sum, slots = sums.tolist()
            kept = float(counts.sum())
            rows.append({
                "layer": name,
                "load": (counts / max(kept, 1.0)).tolist(),
                "imbalance": float(counts.max() / counts.mean()) if kept else float("nan"),
                "entropy": entropy_sum / tokens if tokens else float("nan"),
                "max_entropy": math.log(len(counts)),
                "dropped": 1.0 - kept / slots if slots else 0.0,
                "tokens": int(tokens),
            })  # fmt: skip
        return rows
