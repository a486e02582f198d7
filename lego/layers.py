"""Transformer layers that can compute for a subset of tokens while every token stays visible as context.

A LEGO block runs each layer in one of two modes:

* dense: every token is active; plain causal self-attention (`is_causal=True`), no gathers.
* sparse: only the *active* tokens get a query, an attention output and an FFN. Every token, active or
  not, still contributes keys and values, computed by this layer from its current hidden state (an
  inactive token's state is the one it was kept with). Active tokens are gathered into a flat
  `(n_active, dim)` tensor for the projections and the FFN, so their cost scales with `n_active`;
  attention pads the queries per sequence (`SparseLayout`) and masks by the original positions.

Pre-norm RMSNorm, rotary position embeddings, SwiGLU, no biases (as in Llama-style small LMs).

Fast paths are chosen per call by the tensor's device: on the CPU, hand-written autograd Functions (RMSNorm,
the SwiGLU product) and a complex-number RoPE; on any other device and under torch.compile, plain ops that
compile without a graph break (`F.rms_norm`, `F.silu(g) * u`, a real-valued RoPE with the same pairing).
`CPU_KERNELS = False` forces the plain ops on the CPU too (the tests compare the two).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_KERNELS = True  # False: the plain, compilable ops on the CPU too
SparseAttention = Literal["sdpa", "flex"]


def cpu_kernel(x: Tensor) -> bool:
    """Whether `x` takes the CPU-tuned kernels: a CPU tensor outside torch.compile (dynamo cannot trace them
    without a graph break, and inductor fuses the plain ops anyway)."""
    return CPU_KERNELS and x.device.type == "cpu" and not torch.compiler.is_compiling()


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and state dict) with a faster backward on the CPU.

    On the CPU PyTorch has no fused RMSNorm backward (autograd differentiates the composite formula, about
    3x slower than LayerNorm's fused backward), and its fused forward is slow. The CPU path here computes
    the forward with one `vector_norm` and reuses LayerNorm's fused backward: with the mean fixed at zero
    it computes RMSNorm's gradient except for one term, `-rstd * mean(grad * weight)`, which is added back
    with a matrix-vector product. It covers float32/float64; other dtypes, other devices and
    torch.compile run the plain module (`F.rms_norm`).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (cpu_kernel(x) and x.dtype in (torch.float32, torch.float64) and self.weight is not None):
            return super().forward(x)
        return _CPURMSNormFunction.apply(x, self.weight, self.eps)

    def normalize(self, x: Tensor) -> Tensor:
        """x scaled to unit RMS, without the weight (for a caller that folds the weight into a projection)."""
        return x * _inverse_rms(x, self.eps)


def _inverse_rms(x: Tensor, eps: float | None) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim. One `vector_norm` pass over x (the rest is per row):
    on the CPU much faster than squaring x and averaging, or than aten's `_fused_rms_norm`."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


class _CPURMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float | None) -> Tensor:
        rstd = _inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        # LayerNorm's gradient at mean 0: rstd * (g*w - mean(g*w) - x_hat * mean(g*w * x_hat)).
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [x.shape[-1]], torch.zeros_like(rstd), rstd, weight, None, [need_x, need_weight, False]
        )
        if grad_x is not None:  # RMSNorm's gradient has no mean(g*w) term: add it back
            grad_x.add_(rstd * (grad @ weight).unsqueeze(-1), alpha=1.0 / x.shape[-1])
        return grad_x, grad_weight, None


def swiglu_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """Llama's FFN width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), rounded up."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE, indexed by absolute position so gathered tokens keep their positions."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.cos.shape[0]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of the last dim of `x` (..., heads, head_dim) by its angle; cos/sin
    are (..., head_dim/2). bf16/fp16 rotate in float32. On the CPU one complex multiply, forward and backward:
    about 3x faster there than rotating with separate multiplies; elsewhere the same rotation in real
    arithmetic, which compiles into one fused kernel."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(work).unsqueeze(-2), sin.to(work).unsqueeze(-2)
    if cpu_kernel(x):
        pairs = torch.view_as_complex(x.to(work).unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
    even, odd = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


@dataclass
class SparseLayout:
    """Where the active tokens of a `(batch, seq)` mask live, computed once per block call.

    `flat_index` indexes the active tokens in the flattened `(batch * seq)` order; `padded_index` places
    each of them in a `(batch * max_active)` query buffer for attention, where `attend` lets a query see
    exactly the keys at or before its original position.

    With `bucket > 1` the layer inputs are padded so that a compiled layer sees few distinct shapes: the
    active rows (`gather_index`, `positions`, `padded_index`) to a multiple of `bucket`, and `max_active` to
    one. A padding row gathers token 0 and sits in a query slot of its own at position 0; its outputs are
    never read (`unpad`), so the active tokens' outputs are those of the unpadded layout.
    """

    batch: int
    seq_len: int
    flat_index: Tensor  # (n_active,) int64
    gather_index: Tensor  # (n_rows,) int64: flat_index, then the padding rows' token (0)
    positions: Tensor  # (n_rows,) int64 original positions (padding rows: 0)
    padded_index: Tensor  # (n_rows,) int64, every row its own slot
    max_active: int
    attn_mask: Tensor | None  # (batch, 1, max_active, seq) bool, for SDPA
    block_mask: Any = None  # FlexAttention's BlockMask (attention="flex")

    @classmethod
    def from_mask(cls, active: Tensor, bucket: int = 1, attention: SparseAttention = "sdpa") -> SparseLayout:
        batch, seq_len = active.shape
        flat_index = active.reshape(-1).nonzero().squeeze(1)
        positions = flat_index % seq_len
        rows = flat_index // seq_len
        slot = (active.cumsum(dim=1) - 1).reshape(-1).index_select(0, flat_index)
        max_active = _round_up(int(active.sum(dim=1).max()), bucket)
        padded_index = rows * max_active + slot
        gather_index, n_pad = flat_index, -len(flat_index) % bucket
        if n_pad:  # batch * max_active is a multiple of bucket >= n_active: there are n_pad free slots
            used = torch.zeros(batch * max_active, dtype=torch.bool, device=active.device)
            free = used.index_fill_(0, padded_index, True).logical_not_().nonzero().squeeze(1)[:n_pad]
            padded_index = torch.cat([padded_index, free])
            positions = torch.cat([positions, positions.new_zeros(n_pad)])
            gather_index = torch.cat([flat_index, flat_index.new_zeros(n_pad)])
        # Unused slots get position 0: they see one key (no all-masked rows, hence no NaNs in softmax), widen
        # no FlexAttention block, and their outputs are never read.
        query_pos = torch.zeros(batch * max_active, dtype=torch.long, device=active.device)
        query_pos.index_copy_(0, padded_index, positions)
        query_pos = query_pos.view(batch, max_active)
        if attention == "flex":
            attn_mask, block_mask = None, _causal_block_mask(query_pos, seq_len)
        else:
            key_pos = torch.arange(seq_len, device=active.device)
            attn_mask, block_mask = key_pos.view(1, 1, 1, seq_len) <= query_pos.view(batch, 1, max_active, 1), None
        return cls(batch, seq_len, flat_index, gather_index, positions, padded_index, max_active, attn_mask, block_mask)

    @property
    def n_active(self) -> int:
        return len(self.flat_index)

    def unpad(self, rows: Tensor) -> Tensor:
        """The active tokens' rows of a layer's `(n_rows, ...)` output, without the padding rows."""
        return rows if len(rows) == self.n_active else rows[: self.n_active]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the padded queries (batch, heads, max_active, head_dim) over every key."""
        if self.block_mask is not None:
            return _flex_attention(q, k, v, self.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flex_attention_available() -> bool:
    """FlexAttention came with torch 2.5."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _causal_block_mask(query_pos: Tensor, seq_len: int, block: int = 128):
    """FlexAttention's block mask for queries at `query_pos` (batch, n_queries), key j visible to a query at
    position p when j <= p, built from the positions directly (create_block_mask would evaluate the mask at
    every query-key pair): a block of queries skips the key blocks past its latest position and needs no
    mask for those before its earliest."""
    from torch.nn.attention.flex_attention import BlockMask

    def visible(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return kv <= query_pos[b, q]

    batch, n_queries = query_pos.shape
    q_blocks, kv_blocks = -(-n_queries // block), -(-seq_len // block)

    def per_block(fill: int) -> Tensor:  # (batch, 1, q_blocks, block): the positions, the last block filled up
        return F.pad(query_pos, (0, q_blocks * block - n_queries), value=fill).view(batch, 1, q_blocks, block)

    needed = per_block(0).amax(-1) // block + 1
    # key block j is seen whole by every query of the block when (j + 1) * block - 1 <= its earliest position
    # (never the last key block of a sequence that does not fill it)
    full = torch.minimum((per_block(seq_len).amin(-1) + 1) // block, needed).clamp(max=seq_len // block)
    order = torch.arange(kv_blocks, device=query_pos.device).expand(batch, 1, q_blocks, kv_blocks)
    partial_indices = (order + full.unsqueeze(-1)).clamp(max=kv_blocks - 1)
    return BlockMask.from_kv_blocks(
        (needed - full).int(), partial_indices.int(), full.int(), order.int(), BLOCK_SIZE=block, mask_mod=visible,
        seq_lengths=(n_queries, seq_len),
    )  # fmt: skip


@functools.cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention: its fused kernel needs torch.compile, so an eager call outside the CPU goes through a
    compiled copy; on the CPU (forward only) and inside a compiled region the op itself."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)


class CausalSelfAttention(nn.Module):
    """Queries, keys and values come from one fused projection `wqkv` (rows: q, then k, then v). The
    sparse path multiplies by its row slices: q for the active tokens, k/v for every token."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def _weight(self, rows: slice, scale: Tensor | None) -> Tensor:
        """Rows of `wqkv`; with `scale` (the input norm's weight, for a weight-less normalized input) its
        columns scaled by it: the same product, see `TransformerLayer._attention_input`."""
        weight = self.wqkv.weight[rows]
        return weight if scale is None else weight * scale

    def forward(self, x: Tensor, rope: RotaryEmbedding, scale: Tensor | None = None) -> Tensor:
        """Dense causal attention over (batch, seq, dim)."""
        batch, seq_len, dim = x.shape
        qkv = F.linear(x, self._weight(slice(None), scale)).view(batch, seq_len, 3 * self.num_heads, self.head_dim)
        # split, not two slices: its backward is one concatenation, not two zero-filled copies and a sum
        qk, v = qkv.split([2 * self.num_heads, self.num_heads], dim=2)
        qk = apply_rope(qk, rope.cos[:seq_len], rope.sin[:seq_len])  # q, k at once
        q, k = qk.transpose(1, 2).split(self.num_heads, dim=1)
        v = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, dim))

    def forward_sparse(
        self, x_all: Tensor, x_active: Tensor, layout: SparseLayout, rope: RotaryEmbedding, scale: Tensor | None = None
    ) -> Tensor:
        """Queries for the active tokens only (x_active: (n_rows, dim), the layout's rows); keys/values for
        all of x_all."""
        batch, seq_len, dim = x_all.shape
        n_rows = x_active.shape[0]
        kv = F.linear(x_all, self._weight(slice(dim, None), scale))
        k, v = kv.view(batch, seq_len, 2, self.num_heads, self.head_dim).unbind(2)
        k = apply_rope(k, rope.cos[:seq_len], rope.sin[:seq_len]).transpose(1, 2)
        v = v.transpose(1, 2)
        q = F.linear(x_active, self._weight(slice(dim), scale)).view(n_rows, self.num_heads, self.head_dim)
        q = apply_rope(q, rope.cos[layout.positions], rope.sin[layout.positions])
        q_padded = q.new_zeros(layout.batch * layout.max_active, self.num_heads, self.head_dim)
        q_padded = q_padded.index_copy(0, layout.padded_index, q)
        q_padded = q_padded.view(layout.batch, layout.max_active, self.num_heads, self.head_dim).transpose(1, 2)
        out = layout.attend(q_padded, k, v).transpose(1, 2).reshape(layout.batch * layout.max_active, dim)
        return self.wo(out.index_select(0, layout.padded_index))


class _SwiGLUProduct(torch.autograd.Function):
    """silu(gate) * up from the fused `(..., 2*hidden)` projection. The backward writes both halves of the
    gradient into one buffer; autograd's `chunk` would concatenate two separate ones (a full extra copy)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, where `gate_up` is the fused projection (gate half first)."""
    if cpu_kernel(gate_up):
        return _SwiGLUProduct.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(swiglu(self.w_gate_up(x)))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x + attn(norm(x)), then + ffn(norm(x)).

    `ffn` replaces the SwiGLU (a `lego.moe.MoEFeedForward`): a module mapping (..., dim) to (..., dim). The
    sparse path hands it the active tokens only, so an MoE routes and computes nothing for kept tokens.
    """

    def __init__(
        self, dim: int, num_heads: int, hidden_dim: int, norm_eps: float = 1e-5, ffn: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn = SwiGLU(dim, hidden_dim) if ffn is None else ffn
        self._compiled_sparse: Callable | None = None

    def compile(self, *args, **kwargs) -> None:
        """torch.compile both paths: the dense forward (as `nn.Module.compile`) and `forward_sparse`, with
        the same arguments. Every layer of a model shares the compiled code (dynamo keys it by the code,
        and the parameters are graph inputs): one compile per input shape, not per layer."""
        super().compile(*args, **kwargs)
        self._compiled_sparse = torch.compile(self._forward_sparse, *args, **kwargs)

    def _attention_input(self, *xs: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """The attention's normalized inputs, and the norm weight if it is to be folded into the projection.

        When training gets inputs that need no gradient (the first layer of a block after Block 0: hidden
        states from disk), `norm(x) @ W.T` is computed as `(x / rms(x)) @ (W * norm.weight).T`. Same
        product; but autograd then needs no gradient for the normalized input, whose only use would be
        the norm weight's gradient: that saves a (tokens x 3*dim) @ (3*dim x dim) matrix multiply, about
        10 % of a training step at 10 % hard tokens, where every kept token still feeds keys and values.
        """
        if torch.is_grad_enabled() and self.attn_norm.weight.requires_grad and not any(x.requires_grad for x in xs):
            return [self.attn_norm.normalize(x) for x in xs], self.attn_norm.weight
        return [self.attn_norm(x) for x in xs], None

    def forward(self, x: Tensor, rope: RotaryEmbedding) -> Tensor:
        (normed,), scale = self._attention_input(x)
        x = x + self.attn(normed, rope, scale)
        return x + self.ffn(self.ffn_norm(x))

    def forward_sparse(self, x_all: Tensor, x_active: Tensor, layout: SparseLayout, rope: RotaryEmbedding) -> Tensor:
        """x_all: (batch, seq, dim), the current state of every token (active rows equal x_active);
        x_active: (n_rows, dim), the layout's rows (the active tokens, then any padding). Returns the new
        state of those rows only."""
        sparse = self._compiled_sparse or self._forward_sparse
        return sparse(x_all, x_active, layout, rope)

    def _forward_sparse(self, x_all: Tensor, x_active: Tensor, layout: SparseLayout, rope: RotaryEmbedding) -> Tensor:
        (normed_all, normed_active), scale = self._attention_input(x_all, x_active)
        x_active = x_active + self.attn.forward_sparse(normed_all, normed_active, layout, rope, scale)
        return x_active + self.ffn(self.ffn_norm(x_active))


def layer_token_flops(dim: int, hidden_dim: int, context: float, ffn_flops: float | None = None) -> tuple[float, float]:
    """Forward FLOPs of one layer for one token: (full work of an active token, K/V work of a kept one).

    `context` is the number of keys the token's query attends to (about (seq+1)/2 under a causal mask).
    `ffn_flops`: the FFN's per-token FLOPs when it is not the SwiGLU of width `hidden_dim` (an MoE's
    active experts and router). Norms and elementwise ops are left out: a few percent at any realistic width.
    """
    kv = 2 * dim * 2 * dim
    ffn = 2 * dim * 2 * hidden_dim + 2 * hidden_dim * dim if ffn_flops is None else ffn_flops
    full = 2 * dim * dim * 2 + kv + ffn + 2 * 2 * dim * context
    return float(full), float(kv)
