"""The block-training loop every method runs: a `Method` says what it trains and what its loss is; the loop does the
rest, the same way for all of them.

- AdamW over the method's parameter groups (`lego.training.optim`), warmup + cosine learning rate;
- every step: the method's loss, a divergence check before the update (a NaN never reaches the weights), gradient
  clipping with the exit classifiers on their own (`GradClipper`), the MoE layers' aux-loss-free bias update, the
  schedule, a "step" event for the callback;
- validation `evals_per_epoch` times per epoch (and at the end of each epoch and of training), a step checkpoint
  after each (`lego.training.checkpoint`, resumed from exactly where it left off), early stopping after `patience`
  evaluations without improvement that restores the best weights (`patience` None: no early stopping, the last
  weights are kept);
- the routing of every MoE layer over the steps (`lego.moe.RoutingTally`).

Under torch.distributed (`lego.distributed`, e.g. torchrun) every rank passes its own round-robin shard of the
data (`TrainingData.shard`) and training stays one global computation:
- `batch_size` is the global batch; each rank takes its share of it, all ranks take the same number of steps (the
  fewest any rank has batches for), and each step's loss is the mean over all ranks' tokens: every rank weights
  its loss by its share of the step's tokens and the gradients are summed over ranks after `backward()` (what DDP
  does, without bucketing), so the ranks stay bit-identical;
- each rank shuffles its shard with its own generator; the methods' validations use sums over all ranks.
In a single process none of this runs and the code path is the plain one above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from lego import distributed
from lego.errors import TrainingDiverged
from lego.moe import RoutingTally, step_routing_metrics
from lego.sharding import ShardedLayers, is_sharded, shard_optimizer_state
from lego.training.checkpoint import load_checkpoint, load_trained, save_checkpoint, snapshot
from lego.training.optim import GradClipper, adamw, lr_schedule

if TYPE_CHECKING:
    from lego.model import LEGOBlock
    from lego.moe import MoEFeedForward
    from lego.training_data import TrainingData

Callback = Callable[[dict], None]


@dataclass
class Schedule:
    """How long and how fast a stage trains: the loop's settings that a stage of the `block_schedule` config group
    sets (`lego.pipeline.config.StageConf` is built on these, so each default is defined here once)."""

    epochs: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    patience: int | None = 2  # evaluations without improvement before stopping (None: never stop early)
    evals_per_epoch: int = 1
    max_steps: int | None = None


@dataclass
class LoopConfig(Schedule):
    """What the loop needs to train any method: the `Schedule` and these (LEGO's `FitConfig` adds its own)."""

    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 16
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_path: str | None = None  # resume an interrupted stage from its last evaluation
    divergence_factor: float | None = 3.0  # stop when a step's LM loss is over this times the first's (None: NaN/inf)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


@dataclass
class Step:
    """One batch's loss, as a method computes it."""

    loss: Tensor  # what is backpropagated
    lm_loss: Tensor  # the language-model loss (detached): the divergence check and the training curve
    exit_loss: Tensor  # the exit classifiers' loss (detached)
    tokens: int  # the tokens that got a loss
    flops: list[float]  # training FLOPs (forward + backward) per trained block
    terms: dict[str, float] = field(default_factory=dict)  # more losses to log and average (this rank's)


@dataclass
class Period:
    """The training steps since the previous validation, handed to `Method.validate`."""

    step: int
    epoch: int
    lr: float
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # token-weighted sums of the steps' losses
    step_losses: list[float] = field(default_factory=list)  # every step's LM loss (the training curve)

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.tokens, 1)


class Method(Protocol):
    """A training method: what it trains on (`train`), which modules it trains (`modules`: checkpointed and
    restored in this order; `blocks`: their exit classifiers are clipped on their own and their MoE layers
    balanced), its MoE layers to tally, its optimizer's parameter groups, its loss and its validation."""

    train: TrainingData
    modules: list[nn.Module]
    blocks: list[LEGOBlock]

    def param_groups(self, config: LoopConfig) -> list[dict]: ...

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        """The MoE layers to tally, by name (`LEGOBlock.named_moe_ffns`)."""
        ...

    def step(self, batch: TrainingData, epoch: int) -> Step: ...

    def validate(self, period: Period) -> dict:
        """One evaluation row: at least `val_loss` and `val_ppl` (early stopping, the best weights)."""
        ...


@dataclass
class LoopResult:
    evals: list[dict]  # the validation rows, in order
    best_eval: int  # index of the lowest validation loss (-1: none)
    stopped_early: bool
    train_tokens: int
    train_flops: list[float]  # per trained block
    moe: list[dict]  # per MoE layer, its routing over this process's steps (lego.moe.RoutingTally.summary)
    seconds: float  # training time, earlier processes of a resumed stage included
    steps: int


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


def planned_steps(steps_per_epoch: int, config: LoopConfig) -> int:
    """The steps training takes unless it stops early: `epochs` passes, at most `max_steps`."""
    total = steps_per_epoch * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def train_loop(
    method: Method, config: LoopConfig, *, sharded: ShardedLayers | None = None, callback: Callback | None = None
) -> LoopResult:
    """Train `method` as configured (resuming from `config.checkpoint_path` when it exists); `sharded`: the
    method's layers under FSDP (released to plain weights at the end)."""
    return _Loop(method, config, sharded, callback).run()


class _Loop:
    def __init__(self, method: Method, config: LoopConfig, sharded: ShardedLayers | None, callback: Callback | None):
        self.method, self.config, self.sharded, self.callback = method, config, sharded, callback
        self.rank, self.world = distributed.world()
        self.batch_size = distributed.per_rank(config.batch_size)
        betas = (config.beta1, config.beta2)
        self.optimizer = adamw(method.param_groups(config), config.lr, betas, sharded=sharded is not None)
        self.steps_per_epoch = distributed.global_min(method.train.num_batches(self.batch_size))  # same on all ranks
        self.total_steps = planned_steps(self.steps_per_epoch, config)
        schedule = lr_schedule(config.warmup_steps, config.min_lr_ratio, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.eval_every = max(1, self.steps_per_epoch // config.evals_per_epoch)
        state = {"step": 0, "epoch": 0, "best_loss": float("inf"), "bad_evals": 0, "best": None, "start_loss": None}
        self.record = {"state": state, "evals": [], "train_tokens": 0, "train_flops": [0.0] * len(method.blocks)}
        self.checkpoint = Path(config.checkpoint_path) if config.checkpoint_path else None
        if self.checkpoint is not None and self.checkpoint.is_file():
            self._resume()
        self.state = self.record["state"]
        self.started = time.perf_counter() - self.state.get("seconds", 0.0)
        self.guard = DivergenceGuard(config.divergence_factor, self.state.get("start_loss"))
        self.update = Updater(self.optimizer, self.scheduler, method.blocks, config.grad_clip, sharded is not None)

    def _resume(self) -> None:
        device = next(self.method.modules[0].parameters()).device
        saved = load_checkpoint(self.checkpoint, device)
        load_trained(self.method.modules, saved["weights"])
        optimizer = saved["optimizer"]
        self.optimizer.load_state_dict(shard_optimizer_state(optimizer, self.optimizer) if self.sharded else optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.record["state"].update(saved["state"])
        for key in ("evals", "train_tokens", "train_flops"):
            self.record[key] = saved[key]

    def run(self) -> LoopResult:
        for module in self.method.modules:
            module.train()
        ffns = self.method.named_moe_ffns()
        with RoutingTally(ffns, training=True) as tally:  # hooks removed however the loop ends
            stop = self.state["step"] >= self.total_steps
            while not stop and self.state["epoch"] < self.config.epochs:
                epoch = self.state["epoch"]
                stop = self._epoch(epoch, list(ffns.values()))
                self.state["epoch"] = epoch + 1  # (the epoch's last checkpoint has set it already)
            moe = tally.summary(reduce=True)  # [] for a dense model
        return self._finish(moe)

    def _epoch(self, epoch: int, ffns: list[MoEFeedForward]) -> bool:
        """One pass over this rank's shuffled batches; True when training is over (patience or steps)."""
        # each rank its own shuffle: the same one would pair neighbouring windows in every global batch
        generator = torch.Generator().manual_seed((self.config.seed * 1000 + epoch) * self.world + self.rank)
        period = self._period(epoch)
        batches = self.method.train.batches(self.batch_size, shuffle=True, generator=generator)
        for i, batch in enumerate(batches):
            if i >= self.steps_per_epoch:
                break  # another rank ran out of batches: its remainder is dropped too
            if i < self.state["step"] - epoch * self.steps_per_epoch:
                continue  # resumed mid-epoch: skip what was done (same shuffle, same order)
            self._step(batch, epoch, period, ffns)
            last_of_epoch = i == self.steps_per_epoch - 1
            step = self.state["step"]
            if step % self.eval_every == 0 or last_of_epoch or step >= self.total_steps:
                stop = self._validate(period) or step >= self.total_steps
                period = self._period(epoch)
                if self.checkpoint is not None:
                    if last_of_epoch:
                        self.state["epoch"] = epoch + 1
                    self._save()
                if stop:
                    return True
        return False

    def _period(self, epoch: int) -> Period:
        return Period(self.state["step"], epoch, self._lr())

    def _lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]  # the base learning rate's group (the last one in every method)

    def _step(self, batch: TrainingData, epoch: int, period: Period, ffns: list[MoEFeedForward]) -> None:
        """One optimizer step on `batch`, accounted in `period` and reported to the callback."""
        step = self.method.step(batch, epoch)
        loss, shown_loss, lm_loss, exit_loss, n_tokens, flops = (
            step.loss, step.loss.item(), float(step.lm_loss), float(step.exit_loss), step.tokens, step.flops
        )  # fmt: skip
        if self.world > 1:
            loss, shown_loss, lm_loss, exit_loss, n_tokens, flops = _global_step(step, shown_loss)
        self.guard.check(self.state["step"] + 1, lm_loss)  # before the step: a NaN never reaches the weights
        self.state["start_loss"] = self.guard.start
        grad_norm = self.update(loss)
        self.state["step"] += 1
        self.record["train_tokens"] += n_tokens
        self.record["train_flops"] = [total + f for total, f in zip(self.record["train_flops"], flops, strict=True)]
        terms = {"lm_loss": lm_loss, "exit_loss": exit_loss, **step.terms}
        for key, value in terms.items():
            period.sums[key] = period.sums.get(key, 0.0) + value * n_tokens
        period.tokens += n_tokens
        period.step_losses.append(lm_loss)
        period.step, period.lr = self.state["step"], self._lr()
        if self.callback:
            self.callback({
                "kind": "step", "step": self.state["step"], "epoch": epoch, "loss": shown_loss, "lm_loss": lm_loss,
                "exit_loss": exit_loss, "tokens": n_tokens, "grad_norm": float(grad_norm), "lr": self._lr(),
                **step.terms, **step_routing_metrics(ffns),
            })  # fmt: skip

    def _validate(self, period: Period) -> bool:
        """Record one validation (the method's row); True when patience ran out."""
        with self.sharded.gathered() if self.sharded else nullcontext():
            row = {"step": period.step, "epoch": period.epoch, **self.method.validate(period)}
        self.guard.check(self.state["step"], row["val_loss"], "validation loss")
        self.record["evals"].append(row)
        if self.callback:
            self.callback({"kind": "eval", **row})
        if self.config.patience is None:
            return False
        if row["val_loss"] < self.state["best_loss"]:
            self.state.update(best_loss=row["val_loss"], bad_evals=0, best=snapshot(self.method.modules))
        else:
            self.state["bad_evals"] += 1
        return self.state["bad_evals"] >= self.config.patience

    def _save(self) -> None:
        self.state["seconds"] = time.perf_counter() - self.started
        modules, sharded = self.method.modules, self.sharded is not None
        save_checkpoint(self.checkpoint, modules, self.optimizer, self.scheduler, self.record, sharded)

    def _finish(self, moe: list[dict]) -> LoopResult:
        """The best weights back (with early stopping), plain ones under FSDP, and what the loop did."""
        stopped = self.config.patience is not None and self.state["bad_evals"] >= self.config.patience
        if self.state["best"] is not None:
            load_trained(self.method.modules, self.state["best"])
        if self.sharded:
            self.sharded.release()  # plain, full weights again for calibration, hard tokens, saving and later stages
        evals = self.record["evals"]
        best = min(range(len(evals)), key=lambda i: evals[i]["val_loss"]) if evals else -1
        seconds = time.perf_counter() - self.started
        tokens, flops = self.record["train_tokens"], self.record["train_flops"]
        return LoopResult(evals, best, stopped, tokens, flops, moe, seconds, self.state["step"])


class Updater:
    """One optimizer update from a loss, the same for every method: backward, the ranks' gradient sum, clipping
    with the exit classifiers on their own (`GradClipper`), AdamW, the MoE layers' aux-loss-free bias update and
    the schedule (None: a constant learning rate)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        blocks: list[LEGOBlock],
        grad_clip: float,
        sharded: bool = False,
    ) -> None:
        self.optimizer, self.scheduler, self.blocks, self.grad_clip = optimizer, scheduler, blocks, grad_clip
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.replicated = [p for p in params if not is_sharded(p)]  # FSDP reduce-scatters the sharded ones itself
        self.clip = GradClipper(optimizer, [block.exit_classifier for block in blocks], sharded)

    def __call__(self, loss: Tensor) -> Tensor:
        """Step on `loss`; returns the language model's gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed.world()[1] > 1:
            _sum_gradients(self.replicated)
        grad_norm = self.clip(self.grad_clip)
        self.optimizer.step()
        for block in self.blocks:
            block.update_moe_bias()  # MoE layers' aux-loss-free balancing: outside autograd, once per step
        if self.scheduler is not None:
            self.scheduler.step()
        return grad_norm


def _global_step(step: Step, shown_loss: float) -> tuple[Tensor, float, float, float, int, list[float]]:
    """This rank's part of one global step: its loss weighted by its share of the step's tokens (the summed
    gradients are then those of the mean over every rank's tokens), and the step's global loss values, token
    count and FLOPs for logging and stats."""
    n = step.tokens
    local = [n, shown_loss * n, float(step.lm_loss) * n, float(step.exit_loss) * n, *step.flops]
    sums = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64))
    total = float(sums[0])
    losses = (float(sums[1]) / total, float(sums[2]) / total, float(sums[3]) / total)
    return step.loss * (n / total), *losses, int(total), [float(f) for f in sums[4:]]


def _sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in one collective (a flat buffer, like one DDP bucket)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
