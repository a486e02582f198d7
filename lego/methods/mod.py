"""Mixture-of-Depths (Raposo et al., 2024) as a method of the package: a learned router in front of every other layer
lets only a fixed share of each sequence's tokens (its capacity, 12.5 % by default) through that layer; the others
skip it on the residual stream.

    from lego.methods.mod import MoDConfig, MoDTraining, to_mod

    model = to_mod(LEGOTransformer.from_config(LEGOConfig(vocab, 64, 4, [4])), MoDConfig(capacity=0.125))
    train_loop(MoDTraining(model, MoDConfig(), train, val), LoopConfig())   # model(x) then routes causally

The model is the core `LEGOTransformer` with one block, some of whose layers `to_mod` wraps, in place, in a
`MoDLayer` (`MoDConfig.every`: layers 1, 3, ... by default; the first layer always sees every token):

- routing: `router = nn.Linear(dim, 1)` scores every token. In training the top-k scores of each sequence are routed
  (k = capacity * seq_len): not causal, a token's routing depends on later tokens. At evaluation a token is routed
  where sigmoid(its score) >= 0.5, which depends on the token's own state only: causal. That is the paper's
  router-threshold variant: an auxiliary BCE loss (`aux_loss_weight`) teaches the score to predict "in the top-k",
  reading a detached input, so it trains the router and never bends the representation (as LEGO's exit classifier).
  With `causal_threshold: capacity` the threshold is instead set after training, per layer, to the score above which
  `capacity` of the validation tokens fall (`calibrate_thresholds`): causal still, at the training's compute.
- a routed token's layer update is scaled by its router weight sigmoid(score), so the LM loss reaches the router
  through the top-k choice (the paper scales by the raw score; the sigmoid is bounded and is the same number the
  evaluation thresholds at 0.5); an unrouted token passes unchanged.
- `unrouted_kv`: False (the paper): the routed tokens attend among themselves only, a shorter sequence run through
  the layer's dense path, with rotary positions at their own places; True (LEGO's semantics for kept tokens): every
  unrouted token still gives keys and values, through the layer's sparse path (`TransformerLayer.forward_sparse`).
  Either way the work scales with the routed tokens, and `forward_flops` counts it with the model's per-layer count.

`MoDTransformer.honest_cost` (so `evaluate_routed` and every report) counts the tokens the layers really routed.
Training runs the shared loop (`lego.training.loop`) with `MoDTraining`; `lego.pipeline.mod` runs it from Hydra.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego.errors import ConfigError, check_one_of
from lego.layers import RotaryEmbedding, SparseLayout, TransformerLayer, layer_token_flops
from lego.model import LEGOBlock, LEGOTransformer, _init_weights, cross_entropy_rows, sparse_path
from lego.moe import MoEFeedForward
from lego.training.loop import LoopConfig, Period, Step
from lego.training.optim import param_groups
from lego.training.precision import DEFAULT_PRECISION, autocast
from lego.training.propagation import perplexity
from lego.training.routing import evaluate_routed
from lego.training.selection import calibrate_threshold
from lego.training_data import TrainingData

HISTORY = 100_000  # forwards each MoD layer remembers its routed count for (`MoDLayer.routed_in_last`)
CAUSAL_THRESHOLDS = ("bce", "capacity")  # MoDConfig.causal_threshold


@dataclass
class MoDConfig:
    """Mixture-of-Depths settings (the `mod` node of a run config, `method=mod`)."""

    capacity: float = 0.125  # share of each sequence's tokens a routed layer computes in training (top-k)
    every: int = 2  # route every `every`-th layer: layers every-1, 2*every-1, ... (1: all of them)
    unrouted_kv: bool = False  # unrouted tokens give keys/values in a routed layer (the paper: no; LEGO: yes)
    aux_loss_weight: float = 0.1  # the router's BCE "in the top-k?" loss, which causal evaluation routing reads
    # evaluation routes where the router's score >= a threshold: bce (0, sigmoid 0.5: the BCE predictor's "in the
    # top-k", the paper's) | capacity (per layer, set on the validation split to route `capacity` of its tokens)
    causal_threshold: str = "bce"

    def __post_init__(self) -> None:
        if not 0.0 < self.capacity <= 1.0:
            raise ConfigError(f"mod.capacity={self.capacity} must be in (0, 1], the share of tokens routed, e.g. 0.125")
        if self.every < 1:
            raise ConfigError(f"mod.every={self.every} must be at least 1 (2: every other layer)")
        if self.aux_loss_weight < 0:
            raise ConfigError(f"mod.aux_loss_weight={self.aux_loss_weight} must be >= 0")
        check_one_of("mod.causal_threshold", self.causal_threshold, CAUSAL_THRESHOLDS)

    def routes(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) gets a router."""
        return layer % self.every == self.every - 1


class _RowsAt:
    """One RoPE table (cos or sin) at each routed token's own position: `[:n]` is its (batch, n, head_dim / 2)
    rows, which `apply_rope` broadcasts over the heads of a (batch, n, heads, head_dim) input."""

    def __init__(self, table: Tensor, positions: Tensor) -> None:
        self.rows = table[positions]

    def __getitem__(self, index: slice) -> Tensor:
        return self.rows[:, index]


class _RopeAt:
    """A `RotaryEmbedding` as the dense attention reads it (`rope.cos[:seq_len]`), for a sequence of routed tokens
    gathered from their places: each rotated at its position in the full sequence, not at its rank among them."""

    def __init__(self, rope: RotaryEmbedding, positions: Tensor) -> None:
        self.cos, self.sin = _RowsAt(rope.cos, positions), _RowsAt(rope.sin, positions)


class MoDLayer(nn.Module):
    """A `TransformerLayer` behind a router: only the routed tokens get its update, scaled by their router weight.

    Top-k routing per sequence while training (or when `topk` is True), causal routing in eval mode (or when `topk`
    is False): where the router's score >= `threshold_` (0 unless `calibrate_thresholds` set it: sigmoid 0.5, a
    buffer, saved with the weights). After a training forward `aux_loss` holds the router's BCE loss. Every
    forward appends (tokens, routed tokens) to `history`, which `routed_in_last` reads for the FLOP count.
    """

    def __init__(self, layer: TransformerLayer, capacity: float, unrouted_kv: bool) -> None:
        super().__init__()
        self.layer, self.capacity, self.unrouted_kv = layer, capacity, unrouted_kv
        self.router = nn.Linear(layer.attn.dim, 1).to(layer.attn.wqkv.weight.device)
        _init_weights(self.router)  # as the model's own layers
        self.register_buffer("threshold_", torch.zeros((), device=self.router.weight.device))
        self.topk: bool | None = None  # None: top-k in training mode, the causal threshold in eval mode
        self.aux_loss: Tensor | None = None
        self.history: deque[tuple[int, int]] = deque(maxlen=HISTORY)

    @property
    def ffn(self) -> nn.Module:
        """The wrapped layer's feed-forward (what `LEGOBlock`'s FLOP count and MoE tally read)."""
        return self.layer.ffn

    def forward(self, x: Tensor, rope: RotaryEmbedding) -> Tensor:
        scores = self.router(x).squeeze(-1)  # (batch, seq)
        topk = self.training if self.topk is None else self.topk
        routed, width = self._route(scores, topk)
        if self.training and torch.is_grad_enabled():
            own = F.linear(x.detach(), self.router.weight, self.router.bias).squeeze(-1)
            self.aux_loss = F.binary_cross_entropy_with_logits(own.float(), routed.float())
        if width == 0:
            return x
        weight = torch.sigmoid(scores).to(x.dtype)
        return (self._with_kv if self.unrouted_kv else self._compacted)(x, routed, weight, rope, width)

    def forward_sparse(self, *args, **kwargs) -> Tensor:
        raise NotImplementedError("a MoDLayer routes its tokens itself: its block runs dense (no early exit before it)")

    def _route(self, scores: Tensor, topk: bool) -> tuple[Tensor, int]:
        """The routed tokens (batch, seq) bool and the most any sequence has; records the routed count."""
        batch, seq_len = scores.shape
        if topk:
            k = max(1, int(self.capacity * seq_len))
            routed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
            self.history.append((batch * seq_len, batch * k))
            return routed, k
        routed = scores >= self.threshold_  # from the token's own state alone
        counts = routed.sum(dim=1)
        total, width = torch.stack([counts.sum(), counts.max()]).tolist()  # one host sync
        self.history.append((batch * seq_len, total))
        return routed, width

    def _compacted(self, x: Tensor, routed: Tensor, weight: Tensor, rope: RotaryEmbedding, width: int) -> Tensor:
        """The routed tokens alone as a (batch, width) sequence through the layer's dense causal path; a sequence with
        fewer routed tokens is padded at its end (with unrouted tokens, whose outputs are dropped: the causal mask
        keeps them out of the real tokens' attention)."""
        # each row's routed positions first, in order (a stable sort), then its unrouted ones
        order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = (torch.arange(width, device=x.device) < routed.sum(dim=1, keepdim=True)).unsqueeze(-1)
        index = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        inputs = x.gather(1, index)
        outputs = self.layer(inputs, _RopeAt(rope, order))
        scale = weight.gather(1, order).unsqueeze(-1)
        return x.scatter(1, index, torch.where(valid, inputs + scale * (outputs - inputs), inputs))

    def _with_kv(self, x: Tensor, routed: Tensor, weight: Tensor, rope: RotaryEmbedding, width: int) -> Tensor:
        """LEGO's sparse path: queries and FFN for the routed tokens, keys/values from every token."""
        layout = SparseLayout.from_mask(routed, *sparse_path(x.device.type, isinstance(self.ffn, MoEFeedForward)))
        flat = x.reshape(-1, x.shape[-1])
        rows = self.layer.forward_sparse(x, flat.index_select(0, layout.gather_index), layout, rope)
        inputs = flat.index_select(0, layout.flat_index)
        scale = weight.reshape(-1).index_select(0, layout.flat_index).unsqueeze(-1)
        return flat.index_copy(0, layout.flat_index, inputs + scale * (layout.unpad(rows) - inputs)).view_as(x)

    def routed_in_last(self, n_tokens: int) -> int:
        """How many of the last `n_tokens` tokens this layer saw (its latest forwards) it routed."""
        seen = routed = 0
        for tokens, count in reversed(self.history):
            if seen >= n_tokens:
                break
            seen, routed = seen + tokens, routed + count
        if seen != n_tokens:
            raise RuntimeError(f"{n_tokens} tokens asked about, but this MoD layer's latest forwards saw {seen}")
        return routed


def mod_layers(model: LEGOTransformer) -> dict[str, MoDLayer]:
    """The model's MoD layers, named `block<k>.layer<i>` (i within block k)."""
    return {
        f"block{k}.layer{i}": layer
        for k, block in enumerate(model.blocks)
        for i, layer in enumerate(block.layers)
        if isinstance(layer, MoDLayer)
    }


def forward_flops(
    block: LEGOBlock, n_tokens: int, seq_len: int, routed: Sequence[int | None], n_logits: int = 0
) -> float:
    """Forward FLOPs of one dense call of `block` over `n_tokens` tokens (sequences of `seq_len`), each of its layers
    computing `routed[i]` of them (None: all, a layer without a router), with `LEGOBlock.forward_flops`'s per-layer
    count (`layers.layer_token_flops`): a routed layer costs its router for every token, the full layer for the
    routed ones, and K/V for the others with `unrouted_kv`; without, its attention spans only the routed tokens
    (their mean number per sequence)."""
    total = n_logits * 2 * block.dim * block.head.out_features
    for layer, n_routed in zip(block.layers, routed, strict=True):
        ffn = layer.ffn.token_flops() if isinstance(layer.ffn, MoEFeedForward) else None
        full, kv = layer_token_flops(block.dim, block.hidden_dim, (seq_len + 1) / 2, ffn)
        if n_routed is None:
            total += n_tokens * full
            continue
        if not layer.unrouted_kv:  # a shorter sequence of the routed tokens alone; no K/V from the others
            width = n_routed / max(n_tokens / seq_len, 1.0)
            full, kv = layer_token_flops(block.dim, block.hidden_dim, (width + 1) / 2, ffn)[0], 0.0
        total += n_routed * full + (n_tokens - n_routed) * kv + n_tokens * 2 * block.dim  # + the router
    return total


class MoDTransformer(LEGOTransformer):
    """A LEGOTransformer some of whose layers are `MoDLayer`s (`to_mod` makes one, in place). It has no early exit;
    its honest cost counts what its layers routed over the tokens asked about (their latest forwards: what
    `evaluate_routed` and `forward(..., return_stats=True)` ask right after them)."""

    def honest_cost(self, active_counts: Sequence[int], seq_len: int) -> float:
        n = active_counts[0] if active_counts else 0
        if any(count != n for count in active_counts):
            raise ValueError("a Mixture-of-Depths model routes inside its layers: it has no early exit between blocks")
        head = n * 2 * self.dim * self.vocab_size
        dense = sum(block.forward_flops(n, n, seq_len) for block in self.blocks)
        done = 0.0
        for block in self.blocks:
            routed = [layer.routed_in_last(n) if isinstance(layer, MoDLayer) else None for layer in block.layers]
            done += forward_flops(block, n, seq_len, routed)
        return (done + head) / max(dense + head, 1.0)


def to_mod(model: LEGOTransformer, config: MoDConfig) -> MoDTransformer:
    """`model` as a Mixture-of-Depths model, in place: the layers `config.routes` (numbered over the whole model) get a
    router; no block exits early (every threshold inf)."""
    if isinstance(model, MoDTransformer):
        raise ValueError("this model has its MoD layers already")
    number = 0
    for block in model.blocks:
        block.threshold = float("inf")
        for i, layer in enumerate(block.layers):
            if config.routes(number):
                block.layers[i] = MoDLayer(layer, config.capacity, config.unrouted_kv)
            number += 1
    model.__class__ = MoDTransformer  # the same modules and parameters; only the cost counts the routing
    return model


@torch.no_grad()
def calibrate_thresholds(
    model: LEGOTransformer, windows: Tensor, capacity: float, batch_size: int, precision: str = DEFAULT_PRECISION
) -> None:
    """Set every MoD layer's causal threshold so that it routes about `capacity` of these (validation) windows'
    tokens, layer by layer (a layer's inputs depend on the routing before it): `causal_threshold: capacity`."""
    model.eval()
    for layer in mod_layers(model).values():
        scores = _router_scores(model, layer, windows, batch_size, precision)
        layer.threshold_.fill_(calibrate_threshold(scores, hard_ratio=1.0 - capacity))


def _router_scores(model: LEGOTransformer, layer: MoDLayer, windows: Tensor, batch_size: int, precision: str) -> Tensor:
    """`layer`'s router score of every token of `windows`, the model routing as it is set."""
    device, scores = model.embedding.weight.device, []
    hook = layer.router.register_forward_hook(lambda _, __, out: scores.append(out.float().flatten().cpu()))
    try:
        for batch in windows.split(batch_size):
            with autocast(device, precision):
                model(batch[:, :-1].to(device))
    finally:
        hook.remove()
    return torch.cat(scores)


@contextmanager
def routing(model: LEGOTransformer, topk: bool | None) -> Iterator[None]:
    """Every MoD layer of `model` routes by top-k (True) or causally (False) whatever its mode, then as before."""
    layers = list(mod_layers(model).values())
    saved = [layer.topk for layer in layers]
    for layer in layers:
        layer.topk = topk
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.topk = value


class MoDTraining:
    """Mixture-of-Depths as a loop `Method`: the whole model trained on `train`'s token windows (LM loss plus the
    routers' BCE), validated with the causal routing evaluation uses."""

    def __init__(
        self,
        model: MoDTransformer,
        config: MoDConfig,
        train: TrainingData,
        val: TrainingData,
        eval_batch_size: int = 64,
        precision: str = DEFAULT_PRECISION,
    ) -> None:
        self.model, self.config, self.train, self.precision = model, config, train, precision
        self.val_windows = torch.cat([val.input_ids, val.targets[:, -1:]], dim=1).long()  # ids may be stored narrow
        self.eval_batch_size = eval_batch_size
        self.modules: list[nn.Module] = [model]
        self.blocks = list(model.blocks)
        self.layers = list(mod_layers(model).values())
        self.device = model.embedding.weight.device

    def param_groups(self, config: LoopConfig) -> list[dict]:
        return param_groups(self.modules, config.weight_decay)

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        return self.model.named_moe_ffns()

    def step(self, batch: TrainingData, epoch: int) -> Step:
        x, y = batch.input_ids.to(self.device), batch.targets.to(self.device).long()
        with autocast(self.device, self.precision):
            logits = self.model(x)
        lm_loss = cross_entropy_rows(logits.flatten(0, 1), y.flatten()).mean()
        zero = lm_loss.new_zeros(())
        router = torch.stack([layer.aux_loss for layer in self.layers]).mean() if self.layers else zero
        loss = lm_loss + self.config.aux_loss_weight * router
        for block in self.blocks:  # MoE layers' load-balancing and router z-losses, if any
            if (moe := block.moe_aux_loss()) is not None:
                loss = loss + moe
        n, seq_len = y.numel(), y.shape[1]
        flops = []
        for block in self.blocks:
            routed = [layer.routed_in_last(n) if isinstance(layer, MoDLayer) else None for layer in block.layers]
            flops.append(3 * forward_flops(block, n, seq_len, routed, n_logits=n if block is self.blocks[-1] else 0))
        return Step(loss, lm_loss.detach(), zero, n, flops, {"router_loss": router.detach()})

    def validate(self, period: Period) -> dict:
        """The validation loss through causal routing, with its honest cost, and the training loss since the last."""
        result = evaluate_routed(self.model, self.val_windows, self.eval_batch_size, self.device, self.precision)
        self.model.train()  # evaluate_routed leaves it in eval mode
        train_loss = period.mean("lm_loss")
        return {
            "train_loss": train_loss, "train_ppl": perplexity(train_loss), "val_loss": result["loss"],
            "val_ppl": result["ppl"], "val_acc": result["acc"], "val_honest_cost": result["honest_cost"],
            "router_loss": period.mean("router_loss"), "lr": period.lr, "step_losses": period.step_losses,
        }  # fmt: skip
