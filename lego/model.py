"""LEGOBlock and LEGOTransformer: a decoder-only LM trained block by block, with TRUE token-level early exit.

The model is `embedding -> block 0 -> block 1 -> ... -> shared head`. Every block can produce logits
(through its own output norm and the shared head) and a confidence (`sigmoid(exit_classifier(.))`)
that its prediction is right. At inference a token whose confidence passes its block's threshold exits
there: later blocks keep its hidden state unchanged, use it only as key/value context, and spend no
query, FFN or head work on it. Training block k on the hard tokens of block k-1 runs exactly the same
computation with `active = hard`.

Depends on torch and safetensors only, so it can be used from a notebook.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lego.layers import (
    RMSNorm,
    RotaryEmbedding,
    SparseAttention,
    SparseLayout,
    TransformerLayer,
    flex_attention_available,
    layer_token_flops,
    swiglu_hidden_dim,
)
from lego.moe import MoEConfig, MoEFeedForward

if TYPE_CHECKING:
    from lego.fitting import FitConfig, FitStats
    from lego.training_data import TrainingData

LogitsFor = Literal["active", "exit", "none"]
ConfidenceMethod = Literal["learned", "max_softmax", "entropy"]
CONFIDENCE_METHODS = ("learned", "max_softmax", "entropy")
SPARSE_BUCKET = 64  # the sparse path's padding multiple off the CPU
SPARSE_ATTENTIONS = ("auto", "sdpa", "flex")
LOGIT_CHUNK_ROWS = 4096  # logits rows upcast to float32 at a time (cross-entropy, confidence read off the logits)


def sparse_path(
    device_type: str, has_moe: bool, bucket: int | None = None, attention: str = "auto"
) -> tuple[int, SparseAttention]:
    """How a block's sparse path runs on a device: (padding multiple of its rows, attention kernel).

    `bucket` None: 1 (no padding) on the CPU, where the kernels take any shape and its numbers stay exact,
    and in a block with MoE layers (an expert would route the padding rows; its routing does not compile
    without graph breaks anyway); else `SPARSE_BUCKET`, so a compiled layer sees few shapes. `attention`
    "auto": FlexAttention on CUDA (a fused kernel that skips the masked key blocks), else SDPA with a
    boolean mask (on CUDA its memory-efficient or math kernel).
    """
    if attention not in SPARSE_ATTENTIONS:
        raise ValueError(f"sparse attention must be one of {SPARSE_ATTENTIONS}, got {attention!r}")
    if bucket is not None and (bucket < 1 or (has_moe and bucket > 1)):
        raise ValueError(f"sparse bucket must be >= 1, and 1 in a block with MoE layers; got {bucket}")
    if bucket is None:
        bucket = 1 if device_type == "cpu" or has_moe else SPARSE_BUCKET
    if attention == "auto":
        attention = "flex" if device_type == "cuda" and flex_attention_available() else "sdpa"
    return bucket, attention


def logit_confidence(logits: Tensor, method: str) -> Tensor:
    """Confidence read off a distribution: its top probability, or 1 - entropy / log(vocab); in float32,
    `LOGIT_CHUNK_ROWS` rows at a time (see `cross_entropy_rows`).

    Both need the head for every token a block judges; `learned` (the exit classifier) does not.
    """
    return torch.cat([_logit_confidence(rows, method) for rows in logits.split(LOGIT_CHUNK_ROWS)])


def _logit_confidence(logits: Tensor, method: str) -> Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if method == "max_softmax":
        return log_probs.max(dim=-1).values.exp()
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


def cross_entropy_rows(logits: Tensor, targets: Tensor, chunk: int = LOGIT_CHUNK_ROWS) -> Tensor:
    """Per-row cross-entropy, in float32, of (rows, vocab) `logits` of any dtype (bf16 under autocast), `chunk`
    rows at a time: the float32 copy of the logits, and in training the float32 log-probabilities autograd would
    keep (each chunk's are recomputed in the backward instead), never exceed one chunk, where all rows would take
    13 GB at 64 x 1024 tokens x 50k. Each row's loss is the one-shot computation's, bit for bit: it depends on its
    own row only."""
    if logits.shape[0] <= chunk:
        return _cross_entropy(logits, targets)
    keep_graph = torch.is_grad_enabled() and logits.requires_grad
    parts = [
        checkpoint(_cross_entropy, rows, picked, use_reentrant=False) if keep_graph else _cross_entropy(rows, picked)
        for rows, picked in zip(logits.split(chunk), targets.split(chunk), strict=True)
    ]
    return torch.cat(parts)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _exit_rows(should_exit: Tensor, flat_index: Tensor) -> Tensor:
    """The rows of a block's active tokens (`flat_index` order) that exit."""
    return should_exit.reshape(-1).index_select(0, flat_index).nonzero().squeeze(1)


class BlockOutput(NamedTuple):
    """Everything one block call produces. Tensors over tokens are (batch, seq); `logits` has one row
    per entry of `logits_index` (indices into the flattened batch*seq tokens)."""

    hidden: Tensor  # (batch, seq, dim): active tokens updated, the others unchanged
    logits: Tensor  # (n_selected, vocab)
    logits_index: Tensor  # (n_selected,) int64
    exit_logit: Tensor  # (batch, seq) raw classifier output (0 for inactive tokens)
    confidence: Tensor  # (batch, seq) sigmoid(exit_logit) (0 for inactive tokens)
    should_exit: Tensor  # (batch, seq) bool, False for inactive tokens
    active: Tensor  # (batch, seq) bool: the tokens this call computed


Routed = tuple[BlockOutput, Tensor]  # a block's output and the tokens finishing there (`LEGOTransformer.route`)


class LEGOBlock(nn.Module):
    """A stack of transformer layers that owns its exit decision.

    `block(h, active)` returns `(h, logits, should_exit)`: active tokens get attention, FFN, logits and
    a confidence; inactive ones are returned unchanged but still serve as keys/values at every layer.
    `threshold` is infinite (nothing exits) until `fit` calibrates it. `confidence_method` is "learned"
    (sigmoid of the exit classifier: LEGO's choice, no head work to decide) or, for comparisons,
    "max_softmax" / "entropy" read off the block's own logits.
    The shared LM head belongs to `LEGOTransformer`; the block only holds a reference to it (not a
    submodule), so a block's parameters and optimizer never include the head.
    With `moe`, the layers numbered in `moe_layers` (all of them when None) get an MoE feed-forward
    (`lego.moe`) instead of the SwiGLU; its training needs `moe_aux_loss()` and `update_moe_bias()`.
    `sparse_bucket` and `sparse_attention` choose how the sparse path runs (`sparse_path`; None and "auto":
    by the device), `compile_layers()` compiles every layer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        *,
        hidden_dim: int | None = None,
        max_seq_len: int = 1024,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        threshold: float = float("inf"),
        confidence_method: ConfidenceMethod = "learned",
        moe: MoEConfig | None = None,
        moe_layers: Collection[int] | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) into even head sizes")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if confidence_method not in CONFIDENCE_METHODS:
            raise ValueError(f"confidence_method must be one of {CONFIDENCE_METHODS}, got {confidence_method!r}")
        self.dim, self.num_heads, self.num_layers = dim, num_heads, num_layers
        self.hidden_dim = hidden_dim or swiglu_hidden_dim(dim)
        self.rope = RotaryEmbedding(dim // num_heads, max_seq_len, rope_base)
        moe_layers = range(num_layers) if moe_layers is None else moe_layers
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim, num_heads, self.hidden_dim, norm_eps,
                ffn=MoEFeedForward(dim, self.hidden_dim, moe) if moe is not None and i in moe_layers else None,
            )
            for i in range(num_layers)
        )  # fmt: skip
        self.norm_out = RMSNorm(dim, eps=norm_eps)
        self.exit_classifier = nn.Linear(dim, 1)
        # the threshold as a float32 buffer (state_dict, safetensors) and as that number, which `run` compares with
        # (no tensor read); loading the buffer sets the number (`_threshold_loaded`)
        self.register_buffer("threshold_", torch.tensor(float(threshold)))
        self._threshold = float(self.threshold_)
        self.register_load_state_dict_post_hook(_threshold_loaded)
        self._head: tuple[nn.Linear, ...] = ()  # a plain tuple: not registered as a submodule
        self.confidence_method: ConfidenceMethod = confidence_method
        self.sparse_bucket: int | None = None
        self.sparse_attention: str = "auto"

    def compile_layers(self, *args, **kwargs) -> None:
        """torch.compile every layer, dense and sparse path (`TransformerLayer.compile`, same arguments). The
        layers are the unit: the dense path compiles without a graph break, and the routing around them (the
        sparse layout, which tokens exit) stays eager."""
        for layer in self.layers:
            layer.compile(*args, **kwargs)

    # -- the shared head -------------------------------------------------------------------------
    def attach_head(self, head: nn.Linear) -> None:
        self._head = (head,)

    @property
    def head(self) -> nn.Linear:
        if not self._head:
            raise RuntimeError("this LEGOBlock has no LM head: put it in a LEGOTransformer or call attach_head()")
        return self._head[0]

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.threshold_.fill_(float(value))
        self._threshold = float(torch.tensor(float(value), dtype=self.threshold_.dtype))  # the buffer's value

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, h: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """h: (batch, seq, dim); active: optional bool (batch, seq), None = all tokens.

        Returns `(h, logits, should_exit)` with logits (batch, seq, vocab), zero for inactive tokens.
        """
        out = self.run(h, active, logits_for="active")
        batch, seq_len, _ = h.shape
        logits = out.logits.new_zeros(batch * seq_len, out.logits.shape[-1])
        logits.index_copy_(0, out.logits_index, out.logits)
        return out.hidden, logits.view(batch, seq_len, -1), out.should_exit

    def run(self, h: Tensor, active: Tensor | None = None, logits_for: LogitsFor = "active") -> BlockOutput:
        """The block's computation, with control over which tokens get head work.

        `logits_for`: "active" (every active token, as training needs), "exit" (only tokens that exit
        here, as inference needs: continuing tokens' logits would be thrown away), or "none".
        """
        batch, seq_len, dim = h.shape
        if seq_len > self.rope.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds this block's max_seq_len {self.rope.max_seq_len}")
        dense = active is None or bool(active.all())
        if active is None:
            active = torch.ones(batch, seq_len, dtype=torch.bool, device=h.device)
        if not dense and not bool(active.any()):
            return self._idle_output(h, active)

        if dense:
            x = h
            for layer in self.layers:
                x = layer(x, self.rope)
            hidden = x
            flat_index = torch.arange(batch * seq_len, device=h.device)
            x_active = x.reshape(batch * seq_len, dim)
        else:
            layout = self.sparse_layout(active)
            flat_index = layout.flat_index
            h_flat = h.reshape(batch * seq_len, dim)
            x_rows = h_flat.index_select(0, layout.gather_index)
            x_all = h
            for i, layer in enumerate(self.layers):
                if i > 0:  # refresh the active rows; kept rows stay exactly h
                    x_all = h_flat.index_copy(0, flat_index, layout.unpad(x_rows)).view(batch, seq_len, dim)
                x_rows = layer.forward_sparse(x_all, x_rows, layout, self.rope)
            x_active = layout.unpad(x_rows)
            hidden = h_flat.index_copy(0, flat_index, x_active).view(batch, seq_len, dim)

        normed = self.norm_out(x_active)
        # The classifier reads a detached copy: its BCE loss teaches it to judge the block, never
        # bends the block's representation toward being easy to judge.
        exit_logit_active = self.exit_classifier(normed.detach()).squeeze(-1)
        exit_logit = h.new_zeros(batch * seq_len).index_copy(0, flat_index, exit_logit_active.to(h.dtype))
        exit_logit = exit_logit.view(batch, seq_len)
        all_logits = None
        if self.confidence_method == "learned":
            confidence = torch.sigmoid(exit_logit) * active
        else:  # judged from the block's own distribution, so every active token needs its logits
            all_logits = self.head(normed)
            conf_active = logit_confidence(all_logits.detach(), self.confidence_method)
            confidence = h.new_zeros(batch * seq_len).index_copy(0, flat_index, conf_active.to(h.dtype))
            confidence = confidence.view(batch, seq_len)
        should_exit = (confidence >= self._threshold) & active  # a number: no tensor read, no host sync

        if logits_for == "active":
            logits_index, logits = flat_index, all_logits if all_logits is not None else self.head(normed)
        elif logits_for == "exit" and all_logits is not None:
            chosen = _exit_rows(should_exit, flat_index)
            logits_index, logits = flat_index.index_select(0, chosen), all_logits.index_select(0, chosen)
        elif logits_for == "exit":
            chosen = _exit_rows(should_exit, flat_index)
            logits_index, logits = flat_index.index_select(0, chosen), self.head(normed.index_select(0, chosen))
        else:
            logits_index, logits = flat_index[:0], normed.new_zeros(0, self.head.out_features)
        return BlockOutput(hidden, logits, logits_index, exit_logit, confidence, should_exit, active)

    def rethreshold(self, out: BlockOutput, logits_for: LogitsFor = "exit") -> BlockOutput:
        """`out`, this block's `run(..., logits_for="active")`, as the same call returns it at the current threshold:
        the exit decision made again and only the logits `logits_for` asks for kept. Nothing before the decision
        depends on the threshold, so a scan over thresholds runs the block once (the logits come from one head call
        over every active token instead of one over the chosen rows: equal up to float rounding)."""
        should_exit = (out.confidence >= self._threshold) & out.active
        if logits_for == "active":
            return out._replace(should_exit=should_exit)
        chosen = _exit_rows(should_exit, out.logits_index) if logits_for == "exit" else out.logits_index[:0]
        return out._replace(
            logits=out.logits.index_select(0, chosen), logits_index=out.logits_index.index_select(0, chosen),
            should_exit=should_exit,
        )  # fmt: skip

    def sparse_layout(self, active: Tensor) -> SparseLayout:
        """The layout of a sparse call, padded and with the attention kernel `sparse_path` gives its device."""
        bucket, attention = sparse_path(
            active.device.type, bool(self.moe_ffns), self.sparse_bucket, self.sparse_attention
        )
        return SparseLayout.from_mask(active, bucket, attention)

    def _idle_output(self, h: Tensor, active: Tensor) -> BlockOutput:
        """No active token: the block is not run at all."""
        zeros = h.new_zeros(active.shape)
        empty = torch.zeros(0, dtype=torch.long, device=h.device)
        return BlockOutput(h, h.new_zeros(0, self.head.out_features), empty, zeros, zeros, active, active)

    # -- training --------------------------------------------------------------------------------
    def fit(
        self,
        train: TrainingData,
        val: TrainingData,
        config: FitConfig,
        *,
        embedding: nn.Embedding | None = None,
        callback=None,
    ) -> tuple[TrainingData | None, FitStats]:
        """Train this block on `train`'s active tokens; see `lego.fitting.fit_block`."""
        from lego.fitting import fit_block

        return fit_block(self, train, val, config, embedding=embedding, callback=callback)

    # -- mixture of experts ----------------------------------------------------------------------
    @property
    def moe_ffns(self) -> list[MoEFeedForward]:
        """The MoE feed-forwards of this block's layers (empty for a dense block)."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoEFeedForward)]

    def named_moe_ffns(self, prefix: str = "") -> dict[str, MoEFeedForward]:
        """`{"<prefix>layer<i>": ffn}` for the MoE layers (i counted within the block), for a `RoutingTally`."""
        layers = enumerate(self.layers)
        return {f"{prefix}layer{i}": layer.ffn for i, layer in layers if isinstance(layer.ffn, MoEFeedForward)}

    def moe_aux_loss(self) -> Tensor | None:
        """The weighted balancing and z-losses of the last forward's MoE layers, to add to the training loss
        (None when there are none: a dense block, or MoE layers whose weights make them zero)."""
        losses = [ffn.aux_loss for ffn in self.moe_ffns if ffn.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def update_moe_bias(self) -> None:
        """After every optimizer step: each MoE layer's aux-loss-free bias step (`MoEFeedForward.update_bias`)."""
        for ffn in self.moe_ffns:
            ffn.update_bias()

    # -- FLOPs -----------------------------------------------------------------------------------
    def _layer_token_flops(self, seq_len: int) -> Counter[tuple[float, float]]:
        """How many layers have each (full, kv-only) per-token forward FLOPs (one entry for a uniform block);
        an MoE layer counts its router and active experts only."""
        context = (seq_len + 1) / 2
        return Counter(
            layer_token_flops(
                self.dim, self.hidden_dim, context,
                layer.ffn.token_flops() if isinstance(layer.ffn, MoEFeedForward) else None,
            )
            for layer in self.layers
        )  # fmt: skip

    def layer_flops(self, seq_len: int) -> tuple[float, float]:
        """(full, kv-only) forward FLOPs per token per layer, averaged over the block's layers, see
        `layers.layer_token_flops`."""
        groups = self._layer_token_flops(seq_len)
        if len(groups) == 1:
            return next(iter(groups))
        full = sum(flops[0] * count for flops, count in groups.items()) / self.num_layers
        return full, sum(flops[1] * count for flops, count in groups.items()) / self.num_layers

    def forward_flops(self, n_active: int, n_tokens: int, seq_len: int, n_logits: int = 0) -> float:
        """Forward FLOPs of one call: full layer work for the active tokens, K/V for the kept ones, and
        the shared head for `n_logits` tokens."""
        head = 2 * self.dim * self.head.out_features if n_logits else 0
        layers = sum(
            (n_active * full + (n_tokens - n_active) * kv) * count
            for (full, kv), count in self._layer_token_flops(seq_len).items()
        )
        return layers + n_logits * head


@dataclass
class LEGOConfig:
    """Everything needed to build a LEGOTransformer (the `model` and `block_schedule` config groups)."""

    vocab_size: int
    dim: int = 256
    num_heads: int = 4
    layers_per_block: list[int] = field(default_factory=lambda: [2, 2])
    max_seq_len: int = 1024
    hidden_dim: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    moe: MoEConfig | None = None  # MoE feed-forwards in the layers `moe.layers` names; None: dense SwiGLUs


@dataclass
class ExitStats:
    """Statistics of one routed forward pass (`LEGOTransformer.forward(..., return_stats=True)`)."""

    exit_counts: list[int]  # tokens finishing at each block
    active_counts: list[int]  # tokens reaching (computed by) each block
    mean_confidence: list[float]  # over the tokens reaching each block
    thresholds: list[float]
    compute_cost: float  # sum_k exits_k * layers used / (tokens * total layers), as the original
    honest_cost: float  # FLOPs really done (K/V of kept tokens, head) over the dense model's
    exit_block: Tensor  # (batch, seq) int64: the block each token exited at
    confidences: list[Tensor] = field(repr=False, default_factory=list)  # per block, tokens reaching it

    @property
    def total_tokens(self) -> int:
        return sum(self.exit_counts)

    @property
    def exit_rates(self) -> list[float]:
        return [count / max(self.total_tokens, 1) for count in self.exit_counts]

    @property
    def shallow_ratio(self) -> float:
        """Share of tokens that exit before the last block."""
        return 1.0 - self.exit_counts[-1] / max(self.total_tokens, 1)

    def __getitem__(self, key: str):  # stats["exit_counts"] works as well as stats.exit_counts
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [
            "exit_counts", "active_counts", "exit_rates", "shallow_ratio", "mean_confidence",
            "thresholds", "compute_cost", "honest_cost",
        ]  # fmt: skip

    def as_dict(self) -> dict:
        return {key: self[key] for key in self.keys()}


class LEGOTransformer(nn.Module):
    """Embedding, a list of LEGOBlocks, a shared LM head. It routes tokens between blocks and counts;
    every exit decision is made by the blocks."""

    def __init__(self, vocab_size: int, dim: int, blocks: Sequence[LEGOBlock], tie_embeddings: bool = True) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a LEGOTransformer needs at least one block")
        if any(block.dim != dim for block in blocks):
            raise ValueError(f"every block must have dim={dim}")
        self.vocab_size, self.dim = vocab_size, dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight
        for block in self.blocks:
            block.attach_head(self.head)
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, config: LEGOConfig) -> LEGOTransformer:
        blocks, first_layer = [], 0
        for k, num_layers in enumerate(config.layers_per_block):
            moe_layers = [i for i in range(num_layers) if config.moe and config.moe.uses_moe(k, first_layer + i)]
            first_layer += num_layers
            blocks.append(LEGOBlock(
                config.dim, config.num_heads, num_layers, hidden_dim=config.hidden_dim,
                max_seq_len=config.max_seq_len, rope_base=config.rope_base, norm_eps=config.norm_eps,
                moe=config.moe, moe_layers=moe_layers,
            ))  # fmt: skip
        return cls(config.vocab_size, config.dim, blocks, tie_embeddings=config.tie_embeddings)

    @property
    def total_layers(self) -> int:
        return sum(block.num_layers for block in self.blocks)

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        """Every MoE layer, named `block<k>.layer<i>` (i within block k), for a `RoutingTally`."""
        return {
            name: ffn for k, block in enumerate(self.blocks) for name, ffn in block.named_moe_ffns(f"block{k}.").items()
        }

    def first_block(self, x: Tensor) -> BlockOutput:
        """Block 0's output on token ids `x` with every token's logits: what `forward(x, first=...)` reuses."""
        return self.blocks[0].run(self.embedding(x), None, logits_for="active")

    def route(self, x: Tensor, first: BlockOutput | None = None) -> Iterator[Routed | None]:
        """TRUE early exit, block by block: for each block, its output on the tokens reaching it (`active`; logits
        only for those finishing there) and those tokens (`exits`), or None when no token reaches it and it does
        no work at all. The last block never exits early: every token still active there finishes there.

        `first`: Block 0's output on `x` (`first_block(x)`), used instead of running Block 0 again, so that
        evaluating one batch at several thresholds computes Block 0 once (only its exit decision depends on
        the threshold)."""
        h = self.embedding(x) if first is None else None  # with `first`, Block 0's input is not needed
        remaining: Tensor | None = None  # None = every token (the dense fast path)
        for k, block in enumerate(self.blocks):
            last = k == len(self.blocks) - 1
            if remaining is not None and not bool(remaining.any()):
                yield None
                continue
            logits_for = "active" if last else "exit"
            if k == 0 and first is not None:
                out = block.rethreshold(first, logits_for)
            else:
                out = block.run(h, remaining, logits_for)
            exits = out.active if last else out.should_exit
            yield out, exits
            h, remaining = out.hidden, out.active & ~exits

    def forward(
        self, x: Tensor, return_stats: bool = False, first: BlockOutput | None = None
    ) -> Tensor | tuple[Tensor, ExitStats]:
        """x: (batch, seq) token ids -> logits (batch, seq, vocab), each token's from the block it exited at
        (`route`; `first` as there)."""
        batch, seq_len = x.shape
        logits: Tensor | None = None  # in the head's dtype (bfloat16 under autocast), made at the first block
        exit_block = torch.full((batch, seq_len), len(self.blocks) - 1, dtype=torch.long, device=x.device)
        exit_counts, active_counts, mean_conf, confidences = [], [], [], []
        for k, routed in enumerate(self.route(x, first)):
            if routed is None:
                exit_counts.append(0)
                active_counts.append(0)
                mean_conf.append(float("nan"))
                confidences.append(exit_block.new_zeros(0, dtype=torch.float32))
                continue
            out, exits = routed
            if logits is None:
                logits = out.logits.new_zeros(batch * seq_len, self.vocab_size)
            logits.index_copy_(0, out.logits_index, out.logits)
            if k < len(self.blocks) - 1:
                exit_block.masked_fill_(exits, k)
            n_active = int(out.active.sum())
            exit_counts.append(int(exits.sum()))
            active_counts.append(n_active)
            if return_stats:
                reached = out.confidence[out.active].detach()
                confidences.append(reached)
                mean_conf.append(float(reached.mean()) if n_active else float("nan"))
        logits = logits.view(batch, seq_len, self.vocab_size)
        if not return_stats:
            return logits
        return logits, ExitStats(
            exit_counts=exit_counts,
            active_counts=active_counts,
            mean_confidence=mean_conf,
            thresholds=[block.threshold for block in self.blocks],
            compute_cost=self.compute_cost(exit_counts),
            honest_cost=self.honest_cost(active_counts, seq_len),
            exit_block=exit_block,
            confidences=confidences,
        )

    def compute_cost(self, exit_counts: Sequence[int]) -> float:
        """The original metric: sum over blocks of exits x layers used, over tokens x total layers."""
        layers_used, cost = 0, 0.0
        for block, exits in zip(self.blocks, exit_counts, strict=True):
            layers_used += block.num_layers
            cost += exits * layers_used
        return cost / max(sum(exit_counts) * self.total_layers, 1)

    def honest_cost(self, active_counts: Sequence[int], seq_len: int) -> float:
        """Forward FLOPs really spent over the dense model's. Unlike `compute_cost` it counts the K/V
        projections every running block computes for its kept (inactive) tokens, attention, and the
        shared head (each token gets logits once, at the block it finishes in)."""
        total = active_counts[0] if active_counts else 0
        head = total * 2 * self.dim * self.vocab_size
        done = dense = 0.0
        for block, n_active in zip(self.blocks, active_counts, strict=True):
            dense += block.forward_flops(total, total, seq_len)
            if n_active:
                done += block.forward_flops(n_active, total, seq_len)
        return (done + head) / max(dense + head, 1.0)


def _threshold_loaded(block: LEGOBlock, _) -> None:
    """After `load_state_dict` (a checkpoint, `load_model`): the threshold number is the loaded buffer's."""
    block._threshold = float(block.threshold_)


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
