"""Training one LEGOBlock on the active tokens of a TrainingData, then choosing the next block's hard tokens.

`fit_block` is what `LEGOBlock.fit` runs:
1. AdamW on `LM cross-entropy(active tokens) + exit_loss_weight * BCE(exit classifier, "argmax is right")`,
   warmup + cosine learning rate, gradient clipping, validation after every epoch (or more often),
   early stopping that restores the best weights, and an optional per-epoch checkpoint to resume from.
   Block 0 also trains the embedding and the shared head; later blocks never touch them.
2. Threshold calibration on validation tokens: about `1 - hard_ratio` of the tokens reaching the block exit.
3. Hard tokens by ratio: the bottom `hard_ratio` of the active training tokens by confidence
   (`torch.topk(..., largest=False)`), returned as the next block's TrainingData.

Under torch.distributed (`lego.distributed`, e.g. torchrun) every rank passes its own round-robin shard
of `train` and `val` (`TrainingData.shard`) and the stage stays one global computation:
- `batch_size` is the global batch; each rank takes its share of it, all ranks take the same number of
  steps (the fewest any rank has batches for), and each step's loss is the mean over all ranks' tokens:
  every rank weights its loss by its share of the step's tokens and the gradients are summed over
  ranks after `backward()` (what DDP does, without bucketing), so the ranks stay bit-identical;
- validation loss and early stopping use sums over all ranks; threshold calibration all validation
  confidences;
- hard tokens are the bottom `hard_ratio` of all ranks' active tokens, chosen by the same `topk` over
  the gathered confidences in global token order, so with the same block they are exactly the tokens a
  single process would choose; each rank keeps (and writes) its own.
In a single process none of this runs and the code path is the plain one above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego import distributed
from lego.atomic import atomic_write
from lego.errors import DataError, TrainingDiverged
from lego.moe import RoutingTally, step_routing_metrics
from lego.sharding import ShardedLayers, clip_grad_norm, full_tensors, is_sharded, shard_like, shard_optimizer_state
from lego.training_data import HiddenStateWriter, TrainingData, load_within_budget

if TYPE_CHECKING:
    from lego.model import BlockOutput, LEGOBlock


DUMP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # precisions of a written TrainingData


@dataclass
class FitConfig:
    """Per-stage training settings (the `block_schedule` config group fills one per block)."""

    epochs: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_clip: float = 1.0
    patience: int = 2  # evaluations without improvement before stopping
    evals_per_epoch: int = 1
    exit_loss_weight: float = 1.0
    soft_exit_labels: bool = False  # BCE target exp(-CE) instead of "argmax == target"
    hard_ratio: float | None = 0.5  # None: collect no hard tokens (the last block)
    max_steps: int | None = None
    seed: int = 0
    checkpoint_path: str | None = None  # resume an interrupted stage from its last evaluation
    hard_data_path: str | None = None  # write the hard tokens' TrainingData here, streamed (memory-mapped)
    hard_data_dtype: str = "float32"  # ... with hidden states in this precision: float32 | bfloat16 (half the bytes)
    memory_budget_mb: float | None = 0.0  # ... and read it back into memory if it fits, else map it (None: read)
    divergence_factor: float | None = 3.0  # stop when a step's LM loss is over this times the first's (None: NaN/inf)
    bf16_autocast: bool = True  # training forward passes in bf16 autocast on CUDA; never used on the CPU
    fsdp: bool = False  # under torch.distributed: shard the block's layers while training (`lego.sharding`)

    def __post_init__(self) -> None:
        if self.hard_ratio is not None and not 0.0 < self.hard_ratio < 1.0:
            raise ValueError(f"hard_ratio must be in (0, 1), got {self.hard_ratio}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.hard_data_dtype not in DUMP_DTYPES:
            raise ValueError(f"hard_data_dtype must be one of {', '.join(DUMP_DTYPES)}, got {self.hard_data_dtype!r}")


@dataclass
class FitStats:
    evals: list[dict] = field(default_factory=list)  # one row per validation: step, epoch, losses, PPLs
    best_eval: int = -1
    best_val_ppl: float = float("nan")
    stopped_early: bool = False
    train_tokens: int = 0  # active training tokens seen (token-passes through the block)
    train_flops: float = 0.0  # forward + backward (3x forward), K/V of kept context tokens included
    collect_flops: float = 0.0  # the forward over the training data that scores tokens for the next block
    active_tokens: int = 0  # active tokens in the stage's training data
    hard_count: int = 0
    threshold: float | None = None
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    # per MoE layer of the block, its routing over the training steps this process ran (lego.moe.RoutingTally)
    moe: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


Callback = Callable[[dict], None]


class DivergenceGuard:
    """Stops training whose loss is not finite, or more than `factor` times its first step's (`factor` None: only
    NaN and infinities): a diverged stage fails at once with its step, instead of training on to a model whose
    huge or NaN PPL would read as a result. `start` is the first step's loss of a resumed stage."""

    def __init__(self, factor: float | None, start: float | None = None) -> None:
        self.factor, self.start = factor, start

    def check(self, step: int, loss: float, what: str = "training loss") -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the {what} is {loss} at step {step}")
        if self.start is None:
            self.start = loss
        elif self.factor is not None and loss > self.factor * self.start:
            raise TrainingDiverged(
                f"the {what} {loss:.4g} at step {step} is more than {self.factor:g}x the first step's {self.start:.4g}"
            )


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def block_input(batch: TrainingData, embedding: nn.Embedding | None, weight: Tensor) -> Tensor:
    """The block's input on the device and in the dtype of `weight` (a parameter of the block): hidden
    states stored in lower precision (a bfloat16 dump) are widened back, so the block computes as it would
    on the states it was handed in memory."""
    if batch.input_ids is not None:
        if embedding is None:
            raise ValueError("this TrainingData holds token ids: pass the embedding (Block 0's stage)")
        return embedding(batch.input_ids.to(weight.device))
    return batch.hidden_states.to(device=weight.device, dtype=weight.dtype)


def token_losses(out: BlockOutput, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE and correctness of the tokens that got logits, in `out.logits_index` order."""
    picked = targets.reshape(-1).index_select(0, out.logits_index).long()  # int32 when read from a file
    ce = F.cross_entropy(out.logits.float(), picked, reduction="none")
    return ce, out.logits.argmax(dim=-1) == picked


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices only (not norms, biases or the 1-d exit bias); tied weights counted once."""
    seen, decay, no_decay = set(), [], []
    for module in modules:
        for param in module.parameters():
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(modules: list[nn.Module], config: FitConfig, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `modules`, with the fused kernel (CPU and CUDA): the update
    costs the same whatever the share of hard tokens, so a slow one weighs most on steps over few of them
    (experiments/bench_train_hard.py). Sharded (FSDP) and plain tensors together take the per-parameter loop."""
    groups = param_groups(modules, config.weight_decay)
    kernel = {"foreach": False} if sharded else {"fused": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **kernel)


def lr_schedule(config: FitConfig, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(block: LEGOBlock, data: TrainingData, embedding: nn.Embedding | None, batch_size: int) -> dict:
    """Loss, PPL and accuracy of `block` on `data`'s active tokens, plus their confidences.

    Under torch.distributed `data` is this rank's shard: loss, PPL, accuracy and `tokens` are over all
    ranks' tokens, `confidence` is this rank's only (gather it where the whole set is needed)."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    device = weight.device
    total_ce, correct, count, confidences = 0.0, 0, 0, []
    for batch in data.batches(batch_size):
        out = block.run(block_input(batch, embedding, weight), batch.active.to(device), logits_for="active")
        ce, right = token_losses(out, batch.targets.to(device))
        total_ce += float(ce.sum())
        correct += int(right.sum())
        count += ce.numel()
        confidences.append(out.confidence[out.active].cpu())
    block.train(was_training)
    if distributed.world()[1] > 1:  # `data` is this rank's shard: report the whole set
        sums = distributed.all_reduce_sum(torch.tensor([total_ce, correct, count], dtype=torch.float64))
        total_ce, correct, count = float(sums[0]), int(sums[1]), int(sums[2])
    loss = total_ce / max(count, 1)
    return {
        "loss": loss,
        "ppl": perplexity(loss),
        "acc": correct / max(count, 1),
        "tokens": count,
        "confidence": torch.cat(confidences) if confidences else torch.zeros(0),
    }


@torch.no_grad()
def propagate(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the block over every sequence: (hidden after the block, confidence, should_exit), all
    (sequences, seq[, dim]). Sequences with no active token are not run; their hidden state is kept.
    `out` (e.g. a memory-mapped file) receives the hidden states instead of a new tensor."""
    was_training = block.training
    block.eval()
    weight = block.exit_classifier.weight
    if out is not None:
        hidden = out
        if data.hidden_states is not None:
            idle = ~data.active.any(dim=1)
            hidden[idle] = data.hidden_states[idle].to(hidden.dtype)
    else:
        hidden = data.hidden_states.clone() if data.hidden_states is not None else None
    confidence = torch.zeros(data.targets.shape)
    should_exit = torch.zeros(data.targets.shape, dtype=torch.bool)
    rows = torch.arange(data.num_sequences)
    for start in range(0, data.num_sequences, batch_size):
        index = rows[start : start + batch_size]
        batch = data.select(index)
        if not bool(batch.active.any()):
            if hidden is None:  # token ids: the kept state of an idle sequence is its embedding
                raise ValueError("Block 0's data must have an active token in every sequence")
            continue
        out = block.run(block_input(batch, embedding, weight), batch.active.to(weight.device), logits_for="none")
        if hidden is None:
            hidden = torch.empty(*data.targets.shape, out.hidden.shape[-1], dtype=out.hidden.dtype)
        hidden[index] = out.hidden.to("cpu", hidden.dtype)  # `hidden` may be lower precision (a bfloat16 dump)
        confidence[index] = out.confidence.float().cpu()
        should_exit[index] = out.should_exit.cpu()
    block.train(was_training)
    return hidden, confidence, should_exit


def select_hard(confidence: Tensor, active: Tensor, hard_ratio: float) -> Tensor:
    """The bottom `hard_ratio` of the active tokens by confidence, as a new (sequences, seq) mask.

    By ratio, not by threshold: exactly `int(n_active * hard_ratio)` tokens, whatever the confidences.
    Under torch.distributed, `confidence` and `active` are this rank's shard and the ratio is global
    (`_select_hard_global`).
    """
    if distributed.world()[1] > 1:
        return _select_hard_global(confidence, active, hard_ratio)
    flat_active = active.reshape(-1).nonzero().squeeze(1)
    n_hard = int(len(flat_active) * hard_ratio)
    chosen = torch.topk(confidence.reshape(-1)[flat_active], n_hard, largest=False).indices
    hard = torch.zeros(active.numel(), dtype=torch.bool)
    hard[flat_active[chosen]] = True
    return hard.view_as(active)


def _select_hard_global(confidence: Tensor, active: Tensor, hard_ratio: float) -> Tensor:
    """This rank's share of the bottom `hard_ratio` of every rank's active tokens.

    Every rank gathers all active tokens' confidences with their global flat positions (local sequence
    i is global sequence `i * world + rank`, see `shard_rows`), sorts them into global token order and
    runs the same `topk` as a single process would on the whole data: identical input, identical choice,
    ties included. Costs 12 bytes per active token on every rank.
    """
    rank, world = distributed.world()
    seq_len = active.shape[1]
    local = active.reshape(-1).nonzero().squeeze(1)
    global_seq = (local // seq_len) * world + rank
    positions = torch.cat(distributed.all_gather_variable(global_seq * seq_len + local % seq_len))
    values = torch.cat(distributed.all_gather_variable(confidence.reshape(-1)[local].float()))
    order = positions.argsort()
    positions, values = positions[order], values[order]
    n_hard = int(len(values) * hard_ratio)
    chosen = positions[torch.topk(values, n_hard, largest=False).indices]
    seq = chosen // seq_len
    mine = chosen[seq % world == rank]
    hard = torch.zeros_like(active)
    hard[(mine // seq_len) // world, mine % seq_len] = True
    return hard


def calibrate_threshold(confidence: Tensor, hard_ratio: float) -> float:
    """A threshold at which about `1 - hard_ratio` of these (validation) confidences exit."""
    if confidence.numel() == 0:
        return 1.0
    ordered = confidence.sort().values
    k = min(int(math.ceil(len(ordered) * hard_ratio)), len(ordered) - 1)
    return float(ordered[k])


def route(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    stream_to: str | Path | None = None,
) -> TrainingData:
    """Inference routing as data: the tokens that do not exit at this block stay active for the next one
    (the validation set each later stage trains against). `stream_to`: write it to this file as it is
    computed and return it memory-mapped, instead of building it in memory."""
    if stream_to is None:
        hidden, _, should_exit = propagate(block, data, embedding, batch_size)
        return TrainingData(hidden, data.targets, data.active & ~should_exit)
    _propagate_to_file(block, data, embedding, batch_size, stream_to, lambda _, exits: data.active & ~exits)
    return TrainingData.load(stream_to, mmap=True)


def _propagate_to_file(
    block: LEGOBlock,
    data: TrainingData,
    embedding: nn.Embedding | None,
    batch_size: int,
    path: str | Path,
    next_active: Callable[[Tensor, Tensor], Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """`propagate` straight into a TrainingData file (never whole in memory); its active mask is
    `next_active(confidence, should_exit)`, its hidden states in `dtype` (None: the block's own)."""
    dtype = dtype or block.exit_classifier.weight.dtype
    with HiddenStateWriter(path, data.num_sequences, data.seq_len, block.dim, dtype) as out:
        _, confidence, should_exit = propagate(block, data, embedding, batch_size, out=out.hidden)
        out.finish(data.targets, next_active(confidence, should_exit))


def fit_block(
    block: LEGOBlock,
    train: TrainingData,
    val: TrainingData,
    config: FitConfig,
    *,
    embedding: nn.Embedding | None = None,
    callback: Callback | None = None,
) -> tuple[TrainingData | None, FitStats]:
    """Train `block` (and, for Block 0, `embedding` + the shared head), calibrate its threshold and
    return `(hard_data, stats)`; `hard_data` is None when `config.hard_ratio` is None."""
    started = time.perf_counter()
    device = next(block.parameters()).device
    rank, world = distributed.world()
    batch_size = distributed.per_rank(config.batch_size)
    trained: list[nn.Module] = [block] + ([embedding, block.head] if embedding is not None else [])
    sharded = ShardedLayers(block) if config.fsdp and world > 1 else None
    optimizer = make_optimizer(trained, config, sharded=sharded is not None)
    steps_per_epoch = distributed.global_min(train.num_batches(batch_size))  # every rank takes as many steps
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config, total_steps))
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    stats = FitStats(active_tokens=int(distributed.global_sum(len(train))))
    state = {"step": 0, "epoch": 0, "best_loss": float("inf"), "bad_evals": 0, "best": None, "start_loss": None}

    checkpoint = Path(config.checkpoint_path) if config.checkpoint_path else None
    if checkpoint is not None and checkpoint.is_file():
        saved = load_checkpoint(checkpoint, device)
        _load_trained(trained, saved["weights"])
        optimizer.load_state_dict(
            shard_optimizer_state(saved["optimizer"], optimizer) if sharded else saved["optimizer"]
        )
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["state"])
        stats.evals = saved["evals"]
        stats.train_tokens, stats.train_flops = saved["train_tokens"], saved["train_flops"]
    guard = DivergenceGuard(config.divergence_factor, state.get("start_loss"))

    def validate(epoch: int, train_loss: float, step_losses: list[float]) -> bool:
        """Record one validation, with the LM loss of every training step since the previous one (the
        training curve between validation points); True when patience ran out."""
        with sharded.gathered() if sharded else nullcontext():
            result = evaluate(block, val, embedding, config.eval_batch_size)
        guard.check(state["step"], result["loss"], "validation loss")
        row = {
            "step": state["step"], "epoch": epoch, "train_loss": train_loss,
            "train_ppl": perplexity(train_loss), "val_loss": result["loss"],
            "val_ppl": result["ppl"], "val_acc": result["acc"], "lr": scheduler.get_last_lr()[0],
            "step_losses": step_losses,
        }  # fmt: skip
        stats.evals.append(row)
        if callback:
            callback({"kind": "eval", **row})
        if result["loss"] < state["best_loss"]:
            state.update(best_loss=result["loss"], bad_evals=0, best=_snapshot(trained))
        else:
            state["bad_evals"] += 1
        return state["bad_evals"] >= config.patience

    params = [p for group in optimizer.param_groups for p in group["params"]]
    replicated = [p for p in params if not is_sharded(p)]  # FSDP reduce-scatters the sharded ones itself
    # The exit classifier is clipped on its own: it reads a detached input, and its gradient (often several
    # times the LM's norm early on) must not shrink the language model's steps through a shared clip norm.
    exit_ids = {id(p) for p in block.exit_classifier.parameters()}
    clip_sets = [[p for p in params if id(p) not in exit_ids], [p for p in params if id(p) in exit_ids]]
    clip = clip_grad_norm if sharded else torch.nn.utils.clip_grad_norm_
    block.train()
    # per MoE layer, its routing over the training steps (hooks removed however the loop ends)
    with RoutingTally(block.named_moe_ffns(), training=True) as tally:
        stop = state["step"] >= total_steps
        while not stop and state["epoch"] < config.epochs:
            epoch = state["epoch"]
            # each rank its own shuffle: the same one would pair neighbouring windows in every global batch
            generator = torch.Generator().manual_seed((config.seed * 1000 + epoch) * world + rank)
            running, running_n, step_losses = 0.0, 0, []
            for i, batch in enumerate(train.batches(batch_size, shuffle=True, generator=generator)):
                if i >= steps_per_epoch:
                    break  # another rank ran out of batches: its remainder is dropped too
                if i < state["step"] - epoch * steps_per_epoch:
                    continue  # resumed mid-epoch: skip what was done (same shuffle, same order)
                loss, lm_loss, exit_loss, n_tokens = train_step(block, batch, embedding, config, device)
                shown_loss = loss.item()
                flops = 3 * block.forward_flops(n_tokens, batch.targets.numel(), train.seq_len, n_tokens)
                if world > 1:
                    loss, shown_loss, lm_loss, exit_loss, n_tokens, flops = _global_step(
                        loss, shown_loss, lm_loss, exit_loss, n_tokens, flops
                    )
                guard.check(state["step"] + 1, float(lm_loss))  # before the step: a NaN never reaches the weights
                state["start_loss"] = guard.start
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    _sum_gradients(replicated)
                grad_norm, _ = (clip(subset, config.grad_clip) for subset in clip_sets)  # the LM's norm is reported
                optimizer.step()
                block.update_moe_bias()  # MoE layers' aux-loss-free balancing: outside autograd, once per step
                scheduler.step()
                state["step"] += 1
                stats.train_tokens += n_tokens
                stats.train_flops += flops
                running += float(lm_loss) * n_tokens
                running_n += n_tokens
                step_losses.append(float(lm_loss))
                if callback:
                    callback({
                        "kind": "step", "step": state["step"], "epoch": epoch, "loss": shown_loss,
                        "lm_loss": float(lm_loss), "exit_loss": float(exit_loss), "tokens": n_tokens,
                        "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                        **step_routing_metrics(block.moe_ffns),
                    })  # fmt: skip
                last_of_epoch = i == steps_per_epoch - 1
                if state["step"] % eval_every == 0 or last_of_epoch or state["step"] >= total_steps:
                    stop = validate(epoch, running / max(running_n, 1), step_losses) or state["step"] >= total_steps
                    running, running_n, step_losses = 0.0, 0, []
                    if checkpoint is not None:
                        if last_of_epoch:
                            state["epoch"] = epoch + 1
                        _save_checkpoint(checkpoint, trained, optimizer, scheduler, state, stats, sharded is not None)
                    if stop:
                        break
            state["epoch"] = epoch + 1
        stats.moe = tally.summary(reduce=True)  # [] for a dense block
    stats.stopped_early = state["bad_evals"] >= config.patience
    if state["best"] is not None:
        _load_trained(trained, state["best"])
    if sharded:
        sharded.release()  # plain, full weights again for calibration, hard tokens, saving and later stages
    stats.best_eval = min(range(len(stats.evals)), key=lambda i: stats.evals[i]["val_loss"]) if stats.evals else -1
    stats.best_val_ppl = stats.evals[stats.best_eval]["val_ppl"] if stats.evals else float("nan")
    block.eval()

    hard_data = None
    if config.hard_ratio is not None:
        local_conf = evaluate(block, val, embedding, config.eval_batch_size)["confidence"]
        val_conf = torch.cat(distributed.all_gather_variable(local_conf))  # every rank's validation tokens
        block.threshold = calibrate_threshold(val_conf, config.hard_ratio)
        stats.threshold = block.threshold
        stats.calibration = {
            "val_tokens": int(val_conf.numel()),
            "val_exit_rate": float((val_conf >= block.threshold).float().mean()) if val_conf.numel() else 0.0,
            "target_exit_rate": 1.0 - config.hard_ratio,
        }
        if config.hard_data_path is None:
            hidden, confidence, _ = propagate(block, train, embedding, config.eval_batch_size)
            hard_data = TrainingData(hidden, train.targets, select_hard(confidence, train.active, config.hard_ratio))
        else:  # streamed: the next stage's inputs go straight to disk, come back in memory or memory-mapped

            def pick_hard(confidence: Tensor, _: Tensor) -> Tensor:
                return select_hard(confidence, train.active, config.hard_ratio)

            _propagate_to_file(
                block, train, embedding, config.eval_batch_size, config.hard_data_path, pick_hard,
                DUMP_DTYPES[config.hard_data_dtype],
            )  # fmt: skip
            hard_data = load_within_budget(config.hard_data_path, config.memory_budget_mb)
        stats.hard_count = int(distributed.global_sum(len(hard_data)))
        stats.collect_flops = distributed.global_sum(_collect_flops(block, train))
    stats.seconds = time.perf_counter() - started
    return hard_data, stats


def _collect_flops(block: LEGOBlock, data: TrainingData) -> float:
    """Forward FLOPs of `propagate` over `data`: every sequence with an active token is run (its kept tokens
    for K/V), with head work only when the confidence is read off the logits."""
    run_tokens = int(data.active.any(dim=1).sum()) * data.seq_len
    n_logits = 0 if block.confidence_method == "learned" else len(data)
    return block.forward_flops(len(data), run_tokens, data.seq_len, n_logits)


def train_step(
    block: LEGOBlock, batch: TrainingData, embedding: nn.Embedding | None, config: FitConfig, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, int]:
    weight = block.exit_classifier.weight  # never sharded (FSDP shards the layers only)
    use_bf16 = config.bf16_autocast and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
        out = block.run(block_input(batch, embedding, weight), batch.active.to(device), logits_for="active")
    ce, right = token_losses(out, batch.targets.to(device))  # losses in float32 either way
    lm_loss = ce.mean()
    labels = torch.exp(-ce.detach()) if config.soft_exit_labels else right.float()
    exit_logit = out.exit_logit.reshape(-1).index_select(0, out.logits_index)
    exit_loss = F.binary_cross_entropy_with_logits(exit_logit.float(), labels)
    loss = lm_loss + config.exit_loss_weight * exit_loss
    moe_loss = block.moe_aux_loss()  # MoE layers' load-balancing and router z-losses, over the routed tokens
    if moe_loss is not None:
        loss = loss + moe_loss
    return loss, lm_loss.detach(), exit_loss.detach(), ce.numel()


def _global_step(
    loss: Tensor, shown_loss: float, lm_loss: Tensor, exit_loss: Tensor, n_tokens: int, flops: float
) -> tuple[Tensor, float, float, float, int, float]:
    """This rank's part of one global step: its loss weighted by its share of the step's tokens (the
    summed gradients are then those of the mean over every rank's tokens), and the step's global loss
    values, token count and FLOPs for logging and stats."""
    sums = distributed.all_reduce_sum(
        torch.tensor([n_tokens, shown_loss * n_tokens, float(lm_loss) * n_tokens, float(exit_loss) * n_tokens, flops],
                     dtype=torch.float64)
    )  # fmt: skip
    total = float(sums[0])
    return (
        loss * (n_tokens / total), float(sums[1]) / total, float(sums[2]) / total, float(sums[3]) / total,
        int(total), float(sums[4]),
    )  # fmt: skip


def _sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in one collective (a flat buffer, like one DDP bucket)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


CHECKPOINT_KEYS = ("weights", "optimizer", "scheduler", "state", "evals", "train_tokens", "train_flops")


def load_checkpoint(path: Path, device: torch.device, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """A step checkpoint, plain tensors and numbers only (`weights_only=True`: nothing is unpickled); one that
    holds anything else, is damaged, or lacks `keys` is a one-line DataError saying to delete it."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... here
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(
            f"{path} cannot be loaded as a plain-tensor checkpoint ({reason}); delete it to restart the stage"
        ) from None
    missing = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise DataError(f"{path} is not a LEGO checkpoint (no {', '.join(missing)}); delete it to restart the stage")
    return saved


def _snapshot(modules: list[nn.Module]) -> list[dict[str, Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _load_trained(modules: list[nn.Module], states: list[dict[str, Tensor]]) -> None:
    """Load full or sharded states; full tensors are cut to this rank's shards where a module is sharded."""
    with torch.no_grad():
        for module, module_state in zip(modules, states, strict=True):
            current = module.state_dict()
            if any(is_sharded(value) for value in current.values()):
                module_state = shard_like(module_state, current)
            module.load_state_dict(module_state)


def _save_checkpoint(path: Path, modules, optimizer, scheduler, state: dict, stats: FitStats, sharded: bool) -> None:
    """Atomic (temp file + rename); plain tensors and numbers only, so `weights_only=True` loads it.
    Full tensors even under FSDP (gathered on every rank, written by rank 0): resumable on any number of
    ranks, with or without FSDP. The ranks otherwise hold identical states: rank 0 writes the one file."""
    checkpoint = {
        "weights": _snapshot(modules),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "evals": stats.evals,
        "train_tokens": stats.train_tokens,
        "train_flops": stats.train_flops,
    }
    if sharded:
        checkpoint = full_tensors(checkpoint)
    if distributed.is_main():
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
