"""The block-training loop every method runs: a `Method` says what it trains and what its loss is; the loop does the
rest, the same way for all of them.

- AdamW over the method's parameter groups (`lego.training.optim`), warmup + cosine learning rate;
- every step: the method's loss, a divergence check (a diverged step never reaches the weights, see below),
  gradient clipping with the exit classifiers on their own (`GradClipper`), the MoE layers' aux-loss-free bias
  update, the schedule, a "step" event for the callback;
- validation `evals_per_epoch` times per epoch (and at the end of each epoch and of training), a checkpoint after
  each and every `checkpoint_every_steps` steps between them (`lego.training.checkpoint`, resumed from exactly
  where it left off: the same batch of the same epoch, the steps since the last validation included), early
  stopping after `patience` evaluations without improvement that restores the best weights (`patience` None: no
  early stopping, the last weights are kept);
- the routing of every MoE layer over the steps (`lego.moe.RoutingTally`).

Host syncs: a step's losses and gradient norm stay on the device. They are summed there (float64, in the order a
sum of Python floats takes, so every number is the one a per-step read gives) and read to the host in one read
(`to_host`) every `log_every_steps` steps (and at step 1: the step event then carries them), at each validation and
at each step checkpoint; the dense path of a single process (Block 0) takes no other sync. The divergence check
runs on the device too (`DivergenceGuard.watch`): a diverged step sets a flag on which the fused AdamW skips its
update and every later one (its `found_inf`, as `torch.amp.GradScaler` uses it), so the weights stay those before
that step; the next read raises TrainingDiverged for it (at most `log_every_steps - 1` steps later, whose updates
are skipped too). Under torch.distributed (where a step's values are read once to be all-reduced), and with MoE
layers (whose routing reads counts anyway, and whose bias step is not the optimizer's to skip), each step's LM loss
is checked on the host before the update instead: one more sync per step. The sparse path (a later block's hard
tokens) reads its mask (`all`, `any`) and its layout (`nonzero`, the longest row) every step: its shapes depend on
the data (tests/model/test_host_syncs.py counts them).

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
from lego.errors import TrainingDiverged, check_count, check_number
from lego.moe import RoutingTally, step_routing_metrics
from lego.sharding import ShardedLayers, is_sharded, shard_optimizer_state
from lego.training.checkpoint import load_checkpoint, load_trained, save_checkpoint, snapshot
from lego.training.optim import GradClipper, adamw, lr_schedule
from lego.training.prefetch import prefetch

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

    def check(self, prefix: str = "") -> None:
        """The one range check of these settings (the pipeline's config validation calls it with the stage's key
        as `prefix`): a ConfigError naming the first one out of range."""
        check_count(f"{prefix}epochs", self.epochs)
        check_count(f"{prefix}evals_per_epoch", self.evals_per_epoch)
        check_count(f"{prefix}patience", self.patience, null="no early stopping")
        check_count(f"{prefix}max_steps", self.max_steps, null="the epochs' steps")
        check_count(f"{prefix}warmup_steps", self.warmup_steps, 0)
        check_number(f"{prefix}lr", self.lr, low=0, low_open=True, hint="e.g. 1e-3")
        check_number(f"{prefix}min_lr_ratio", self.min_lr_ratio, low=0, high=1, hint="the cosine's floor, e.g. 0.1")
        check_number(f"{prefix}weight_decay", self.weight_decay, low=0, hint="e.g. 0.1")


def check_loop_settings(config, prefix: str = "") -> None:
    """The range check of the loop settings the `trainer` config group sets (`config`: a LoopConfig or the
    pipeline's TrainerConf, which have these fields)."""
    check_number(f"{prefix}grad_clip", config.grad_clip, low=0, low_open=True, hint="e.g. 1.0")
    if config.divergence_factor is not None:
        check_number(f"{prefix}divergence_factor", config.divergence_factor, low=1, low_open=True,
                     hint="e.g. 3, or null to stop only on NaN/inf")  # fmt: skip
    check_count(f"{prefix}log_every_steps", config.log_every_steps, hint="10")
    check_count(f"{prefix}checkpoint_every_steps", config.checkpoint_every_steps, null="at validations only")


@dataclass
class LoopConfig(Schedule):
    """What the loop needs to train any method: the `Schedule` and these (LEGO's `FitConfig` adds its own)."""

    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 16
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_path: str | None = None  # resume an interrupted stage from its last checkpoint
    checkpoint_every_steps: int | None = 500  # a checkpoint this often besides the validations' (None: those only)
    divergence_factor: float | None = 3.0  # stop when a step's LM loss is over this times the first's (None: NaN/inf)
    log_every_steps: int = 10  # read the step's losses to the host (step event, divergence check) this often

    def __post_init__(self) -> None:
        self.check()
        check_count("batch_size", self.batch_size)
        check_loop_settings(self)


@dataclass
class Step:
    """One batch's loss, as a method computes it."""

    loss: Tensor  # what is backpropagated
    lm_loss: Tensor  # the language-model loss (detached, 0-dim): the divergence check and the training curve
    exit_loss: Tensor  # the exit classifiers' loss (detached, 0-dim)
    tokens: int  # the tokens that got a loss
    flops: list[float]  # training FLOPs (forward + backward) per trained block
    # more losses to log and average (this rank's): 0-dim detached tensors (read with the others) or numbers
    terms: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass
class Period:
    """The training steps since the previous validation, handed to `Method.validate` (or saved in a step
    checkpoint). While it runs, its losses stay on the device (`add`); `read` brings them to the host, into
    `sums` and `step_losses`."""

    step: int
    epoch: int
    lr: float
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # token-weighted sums of the steps' losses
    step_losses: list[float] = field(default_factory=list)  # every step's LM loss (the training curve)
    # the running sums (float64 tensors, or numbers for terms given as numbers) and the unread steps' LM losses
    totals: dict[str, Tensor | float] = field(default_factory=dict, repr=False)
    pending: list[Tensor | float] = field(default_factory=list, repr=False)

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(self.tokens, 1)

    def add(self, terms: dict[str, Tensor | float], tokens: int) -> None:
        """One step's losses (`lm_loss` among them) weighted by its `tokens`, summed without a host sync: in
        float64 and in the steps' order, the sums are bit for bit those of the Python floats."""
        for key, value in terms.items():
            weighted = (value.double() if isinstance(value, Tensor) else value) * tokens
            self.totals[key] = self.totals.get(key, 0.0) + weighted
        self.tokens += tokens
        self.pending.append(terms["lm_loss"])

    def read(self, to_host: Callable[[list], list[float]]) -> None:
        """`sums` and `step_losses` up to date, through `to_host` (the loop's one host read)."""
        values = to_host([*self.totals.values(), *self.pending])
        self.sums = dict(zip(self.totals, values[: len(self.totals)], strict=True))
        self.step_losses += values[len(self.totals) :]
        self.pending = []

    def saved(self) -> dict:
        """The read period as plain numbers, for a checkpoint (`Period.restore` continues it exactly)."""
        return {"step": self.step, "epoch": self.epoch, "lr": self.lr, "tokens": self.tokens,
                "sums": dict(self.sums), "step_losses": list(self.step_losses)}  # fmt: skip

    @classmethod
    def restore(cls, saved: dict) -> Period:
        return cls(**saved, totals=dict(saved["sums"]))


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

    def step(self, batch: TrainingData, epoch: int) -> Step:
        """One batch's loss. A method whose steps depend on their number may also define `resume_at(step)`: the
        loop calls it with the steps already taken when it resumes a checkpoint."""
        ...

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
    NaN and infinities): a diverged stage fails with its step, instead of training on to a model whose huge or NaN
    PPL would read as a result. `start` is the first step's loss of a resumed stage.

    `check` tests a number on the host. `watch` tests a step's loss on the device, without a host sync: its sticky
    flag is what the optimizer skips updates on, and `replay` runs `check` over the losses of the flagged steps once
    they are read. The first step's loss must be `check`ed (read) before the second is `watch`ed."""

    def __init__(self, factor: float | None, start: float | None = None) -> None:
        self.factor, self.start = factor, start
        self.flag: Tensor | None = None  # bool on the device: some step `watch`ed so far diverged

    def check(self, step: int, loss: float, what: str = "training loss") -> None:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the {what} is {loss} at step {step}")
        if self.start is None:
            self.start = loss
        elif self.factor is not None and loss > self.factor * self.start:
            raise TrainingDiverged(
                f"the {what} {loss:.4g} at step {step} is more than {self.factor:g}x the first step's {self.start:.4g}"
            )

    def watch(self, loss: Tensor) -> Tensor:
        """`check`'s test of a step's loss on the device (float64, as on the host); returns the sticky flag."""
        loss = loss.double()
        bad = ~torch.isfinite(loss)
        if self.start is not None and self.factor is not None:
            bad = bad | (loss > self.factor * self.start)
        self.flag = bad if self.flag is None else self.flag | bad
        return self.flag

    def replay(self, first_step: int, losses: list[float]) -> None:
        """After the flag was read set: `check` over the losses of the steps from `first_step` on, which raises
        for the first that diverged."""
        for step, loss in enumerate(losses, start=first_step):
            self.check(step, loss)
        last = first_step + len(losses) - 1
        raise AssertionError(f"the device flagged one of steps {first_step}..{last}, which the host check passes")


def to_host(values: list[Tensor | float]) -> list[float]:
    """Numbers and 0-dim tensors as Python floats, all the tensors in one host read (as float64: exact for float32
    and bfloat16 values, so each is the float() of its tensor)."""
    tensors = [value.detach().reshape(1) for value in values if isinstance(value, Tensor)]
    device = tensors[0].device if tensors else None
    read = iter(torch.cat([t.to(device, torch.float64) for t in tensors]).tolist() if tensors else ())
    return [next(read) if isinstance(value, Tensor) else value for value in values]


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
        self.device = next(method.modules[0].parameters()).device
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
        # check each step's loss on the host before its update (see the module's docstring), or on the device
        self.host_check = self.world > 1 or bool(method.named_moe_ffns())
        self.update = Updater(self.optimizer, self.scheduler, method.blocks, config.grad_clip, sharded is not None)

    def _resume(self) -> None:
        saved = load_checkpoint(self.checkpoint, self.device)
        load_trained(self.method.modules, saved["weights"])
        optimizer = saved["optimizer"]
        self.optimizer.load_state_dict(shard_optimizer_state(optimizer, self.optimizer) if self.sharded else optimizer)
        for group in self.optimizer.param_groups:  # this process's AdamW kernel, not the saver's (FSDP's or not)
            group.update({key: self.optimizer.defaults[key] for key in ("fused", "foreach")})
        self.scheduler.load_state_dict(saved["scheduler"])
        self.record["state"].update(saved["state"])
        for key in ("evals", "train_tokens", "train_flops"):
            self.record[key] = saved[key]
        if hasattr(self.method, "resume_at"):  # a method whose steps depend on their number (Universal's curricula)
            self.method.resume_at(self.record["state"]["step"])

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
        saved = self.state.pop("period", None)  # a step checkpoint's steps since the last validation
        period = Period.restore(saved) if saved else self._period(epoch)
        done = max(0, self.state["step"] - epoch * self.steps_per_epoch)  # resumed mid-epoch: the batches trained on
        batches = self.method.train.batches(self.batch_size, shuffle=True, generator=generator, skip=done)
        batches = prefetch(batches, self.device)  # made ahead in a thread on CUDA; as they come elsewhere
        every = self.config.checkpoint_every_steps
        for i, batch in enumerate(batches, start=done):  # the same shuffle, the same order, the rest of it
            if i >= self.steps_per_epoch:
                break  # another rank ran out of batches: its remainder is dropped too
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
            elif self.checkpoint is not None and every is not None and step % every == 0:
                self._read_period(period)
                self._save(period)
        return False

    def _period(self, epoch: int) -> Period:
        return Period(self.state["step"], epoch, self._lr())

    def _lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]  # the base learning rate's group (the last one in every method)

    def _step(self, batch: TrainingData, epoch: int, period: Period, ffns: list[MoEFeedForward]) -> None:
        """One optimizer step on `batch`, accounted in `period` and reported to the callback: every step with its
        step, tokens and learning rate, every `log_every_steps` steps (and the first) with its losses too."""
        step = self.method.step(batch, epoch)
        number = self.state["step"] + 1
        loss, n_tokens, flops = step.loss, step.tokens, step.flops
        shown = {"loss": loss.detach(), "lm_loss": step.lm_loss, "exit_loss": step.exit_loss}
        if self.world > 1:
            loss, shown, n_tokens, flops = _global_step(step)
        skip = None
        if self.host_check:  # before the update: a diverged step never reaches the weights
            self.guard.check(number, to_host([shown["lm_loss"]])[0])
        else:  # on the device: the update is skipped, and raised at the next read
            skip = self.guard.watch(shown["lm_loss"])
        grad_norm = self.update(loss, skip)
        self.state["step"] = number
        self.record["train_tokens"] += n_tokens
        self.record["train_flops"] = [total + f for total, f in zip(self.record["train_flops"], flops, strict=True)]
        period.add({"lm_loss": shown["lm_loss"], "exit_loss": shown["exit_loss"], **step.terms}, n_tokens)
        period.step, period.lr = number, self._lr()
        event = {"kind": "step", "step": number, "epoch": epoch, "tokens": n_tokens, "lr": period.lr}
        if number == 1 or number % self.config.log_every_steps == 0:
            logged = {**shown, "grad_norm": grad_norm, **step.terms}
            event |= dict(zip(logged, self._read(period, list(logged.values())), strict=True))
            self.guard.check(number, event["lm_loss"])  # passes (the flag was not set); at step 1 it sets `start`
            event |= step_routing_metrics(ffns)
        if self.callback:
            self.callback(event)

    def _read(self, period: Period, values: list[Tensor | float]) -> list[float]:
        """`values` on the host, in one read with the divergence flag; raises TrainingDiverged for the first step
        of `period` not read yet that diverged (its update and the later ones were skipped)."""
        *read, diverged = to_host([*values, 0.0 if self.guard.flag is None else self.guard.flag])
        if diverged:
            self.guard.replay(period.step - len(period.pending) + 1, to_host(period.pending))
        return read

    def _read_period(self, period: Period) -> None:
        period.read(lambda values: self._read(period, values))

    def _validate(self, period: Period) -> bool:
        """Record one validation (the method's row); True when patience ran out."""
        self._read_period(period)
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

    def _save(self, period: Period | None = None) -> None:
        """A checkpoint; `period`: the (read) steps since the last validation, at a step checkpoint."""
        self.state.update(seconds=time.perf_counter() - self.started, start_loss=self.guard.start)
        self.state["period"] = period.saved() if period is not None else None
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

    def __call__(self, loss: Tensor, skip: Tensor | None = None) -> Tensor:
        """Step on `loss`; returns the language model's gradient norm before clipping. `skip`: a bool tensor on
        the device; when True the fused AdamW leaves the weights and its state as they are (its `found_inf`, as
        `torch.amp.GradScaler` uses it): a step skipped without a host sync."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed.world()[1] > 1:
            _sum_gradients(self.replicated)
        grad_norm = self.clip(self.grad_clip)
        if skip is not None:
            self.optimizer.found_inf = skip.float()
        self.optimizer.step()
        if skip is not None:
            del self.optimizer.found_inf
        for block in self.blocks:
            block.update_moe_bias()  # MoE layers' aux-loss-free balancing: outside autograd, once per step
        if self.scheduler is not None:
            self.scheduler.step()
        return grad_norm


def _global_step(step: Step) -> tuple[Tensor, dict[str, float], int, list[float]]:
    """This rank's part of one global step: its loss weighted by its share of the step's tokens (the summed
    gradients are then those of the mean over every rank's tokens), and the step's global loss values, token
    count and FLOPs for logging and stats (read to the host in one read)."""
    n = step.tokens
    local = [n, *(value * n for value in to_host([step.loss, step.lm_loss, step.exit_loss])), *step.flops]
    sums = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
    total = sums[0]
    shown = {key: value / total for key, value in zip(("loss", "lm_loss", "exit_loss"), sums[1:4], strict=True)}
    return step.loss * (n / total), shown, int(total), sums[4:]


def _sum_gradients(params: list[nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks in one collective (a flat buffer, like one DDP bucket)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
