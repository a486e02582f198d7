"""LEGO's method, block by block: `fit_block` (what `LEGOBlock.fit` runs) trains one block on the active tokens of a
TrainingData through the shared loop (`lego.training.loop`), then chooses the next block's hard tokens.

1. The loss: `LM cross-entropy(active tokens) + exit_loss_weight * BCE(exit classifier, "argmax is right")` (plus
   the MoE layers' auxiliary losses). Block 0 also trains the embedding and the shared head; later blocks never
   touch them. Schedule, clipping, validation, early stopping, checkpoints and resume are the loop's.
2. Threshold calibration on validation tokens: about `1 - hard_ratio` of the tokens reaching the block exit.
3. Hard tokens by ratio: the bottom `hard_ratio` of the active training tokens by confidence
   (`torch.topk(..., largest=False)`), returned as the next block's TrainingData (`lego.training.selection`).

Under torch.distributed every rank passes its own round-robin shard of `train` and `val` (`TrainingData.shard`) and
the stage stays one global computation (see `lego.training.loop`); threshold calibration uses all validation
confidences, hard-token selection all ranks' active tokens.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego import distributed
from lego.moe import MoEFeedForward
from lego.sharding import ShardedLayers
from lego.training.loop import Callback, LoopConfig, Period, Schedule, Step, train_loop
from lego.training.optim import param_groups
from lego.training.propagation import (
    block_input,
    collect_flops,
    evaluate,
    perplexity,
    propagate,
    propagate_to_file,
    token_losses,
)
from lego.training.selection import calibrate_threshold, select_hard
from lego.training_data import TrainingData, load_within_budget

if TYPE_CHECKING:
    from lego.model import LEGOBlock


DUMP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # precisions of a written TrainingData


@dataclass
class StageTraining(Schedule):
    """What a `block_schedule` stage sets for LEGO's method: the loop's `Schedule` and the exit loss."""

    exit_loss_weight: float = 1.0
    soft_exit_labels: bool = False  # BCE target exp(-CE) instead of "argmax == target"


@dataclass
class FitConfig(LoopConfig, StageTraining):
    """Per-stage training settings (`lego.pipeline.config.fit_config` fills one per block): the loop's
    (`LoopConfig`), the stage's (`StageTraining`) and these."""

    eval_batch_size: int = 64
    hard_ratio: float | None = 0.5  # None: collect no hard tokens (the last block)
    hard_data_path: str | None = None  # write the hard tokens' TrainingData here, streamed (memory-mapped)
    hard_data_dtype: str = "float32"  # ... with hidden states in this precision: float32 | bfloat16 (half the bytes)
    memory_budget_mb: float | None = 0.0  # ... and read it back into memory if it fits, else map it (None: read)
    bf16_autocast: bool = True  # training forward passes in bf16 autocast on CUDA; never used on the CPU
    fsdp: bool = False  # under torch.distributed: shard the block's layers while training (`lego.sharding`)

    def __post_init__(self) -> None:
        if self.hard_ratio is not None:
            check_hard_ratio(self.hard_ratio)
        super().__post_init__()
        if self.hard_data_dtype not in DUMP_DTYPES:
            raise ValueError(f"hard_data_dtype must be one of {', '.join(DUMP_DTYPES)}, got {self.hard_data_dtype!r}")


def check_hard_ratio(ratio: float, key: str = "hard_ratio") -> None:
    """The one range check of a hard ratio (`FitConfig` and the pipeline's config validation both call it): a share
    of the tokens strictly between 0 and 1; `key` names it in the error."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ValueError(f"{key}={ratio} must be a number in (0, 1): the share of tokens passed on as hard")


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


class BlockMethod:
    """One LEGO stage as a loop `Method`: the block (and, for Block 0, the embedding and the shared head) trained
    on the active tokens of `train`, validated on `val`'s."""

    def __init__(
        self,
        block: LEGOBlock,
        train: TrainingData,
        val: TrainingData,
        config: FitConfig,
        embedding: nn.Embedding | None,
    ) -> None:
        self.block, self.train, self.val, self.config, self.embedding = block, train, val, config, embedding
        self.modules: list[nn.Module] = [block] + ([embedding, block.head] if embedding is not None else [])
        self.blocks = [block]
        self.device = next(block.parameters()).device

    def param_groups(self, config: FitConfig) -> list[dict]:
        return param_groups(self.modules, config.weight_decay)

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        return self.block.named_moe_ffns()

    def step(self, batch: TrainingData, epoch: int) -> Step:
        loss, lm_loss, exit_loss, n_tokens = train_step(self.block, batch, self.embedding, self.config, self.device)
        flops = 3 * self.block.forward_flops(n_tokens, batch.targets.numel(), self.train.seq_len, n_tokens)
        return Step(loss, lm_loss, exit_loss, n_tokens, [flops])

    def validate(self, period: Period) -> dict:
        """The validation loss with the LM loss of every training step since the previous one (the training curve
        between validation points)."""
        result = evaluate(self.block, self.val, self.embedding, self.config.eval_batch_size)
        train_loss = period.mean("lm_loss")
        return {
            "train_loss": train_loss, "train_ppl": perplexity(train_loss), "val_loss": result["loss"],
            "val_ppl": result["ppl"], "val_acc": result["acc"], "lr": period.lr, "step_losses": period.step_losses,
        }  # fmt: skip


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
    sharded = ShardedLayers(block) if config.fsdp and distributed.world()[1] > 1 else None
    result = train_loop(BlockMethod(block, train, val, config, embedding), config, sharded=sharded, callback=callback)
    stats = FitStats(
        evals=result.evals, best_eval=result.best_eval, stopped_early=result.stopped_early,
        train_tokens=result.train_tokens, train_flops=result.train_flops[0], moe=result.moe,
        active_tokens=int(distributed.global_sum(len(train))),
        best_val_ppl=result.evals[result.best_eval]["val_ppl"] if result.evals else float("nan"),
    )  # fmt: skip
    block.eval()
    hard_data = None
    if config.hard_ratio is not None:
        calibrate(block, val, embedding, config, stats)
        hard_data = collect_hard(block, train, embedding, config)
        stats.hard_count = int(distributed.global_sum(len(hard_data)))
        stats.collect_flops = distributed.global_sum(collect_flops(block, train))
    stats.seconds = time.perf_counter() - started
    return hard_data, stats


def calibrate(block: LEGOBlock, val: TrainingData, embedding: nn.Embedding | None, config: FitConfig, stats: FitStats):
    """Set the block's threshold so that about `1 - hard_ratio` of every rank's validation tokens exit there."""
    local_conf = evaluate(block, val, embedding, config.eval_batch_size)["confidence"]
    val_conf = torch.cat(distributed.all_gather_variable(local_conf))  # every rank's validation tokens
    block.threshold = calibrate_threshold(val_conf, config.hard_ratio)
    stats.threshold = block.threshold
    stats.calibration = {
        "val_tokens": int(val_conf.numel()),
        "val_exit_rate": float((val_conf >= block.threshold).float().mean()) if val_conf.numel() else 0.0,
        "target_exit_rate": 1.0 - config.hard_ratio,
    }


def collect_hard(block: LEGOBlock, train: TrainingData, embedding: nn.Embedding | None, config: FitConfig):
    """The next block's inputs: every training token's state after `block`, with the hard ones active; in memory,
    or streamed to `config.hard_data_path` and read back in memory or memory-mapped."""
    if config.hard_data_path is None:
        hidden, confidence, _ = propagate(block, train, embedding, config.eval_batch_size)
        return TrainingData(hidden, train.targets, select_hard(confidence, train.active, config.hard_ratio))

    def pick_hard(confidence: Tensor, _: Tensor) -> Tensor:
        return select_hard(confidence, train.active, config.hard_ratio)

    dtype = DUMP_DTYPES[config.hard_data_dtype]
    propagate_to_file(block, train, embedding, config.eval_batch_size, config.hard_data_path, pick_hard, dtype)
    return load_within_budget(config.hard_data_path, config.memory_budget_mb)


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
