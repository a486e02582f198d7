"""LEGO's method, block by block: `fit_block` (what `LEGOBlock.fit` runs) trains one block on the active tokens of a
TrainingData through the shared loop (`lego.training.loop`), then chooses the next block's hard tokens.

1. The loss: `LM cross-entropy(active tokens) + exit_loss_weight * BCE(exit classifier, "argmax is right")` (plus
   the MoE layers' auxiliary losses). Block 0 also trains the embedding and the shared head; later blocks never
   touch them. Schedule, clipping, validation, early stopping, checkpoints and resume are the loop's.
2. Threshold calibration on validation tokens: about `1 - hard_ratio` of the tokens reaching the block exit.
3. Hard tokens by ratio: the bottom `hard_ratio` of the active training tokens by confidence
   (`torch.topk(..., largest=False)`), returned as the next block's TrainingData (`lego.training.selection`). Streamed
   (`FitConfig.hard_mask_path`, `trainer.dump=stream`), only their mask is written, chosen in bounded memory
   (`select_hard_chunked`), and the next block's TrainingData computes its inputs per batch (`StreamedTrainingData`).

Under torch.distributed every rank passes its own round-robin shard of `train` and `val` (`TrainingData.shard`) and
the stage stays one global computation (see `lego.training.loop`); threshold calibration uses all validation
confidences, hard-token selection all ranks' active tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego import distributed
from lego.errors import ConfigError, check_number
from lego.memory import release_freed_memory
from lego.moe import MoEFeedForward
from lego.sharding import ShardedLayers
from lego.training.loop import Callback, LoopConfig, Period, Schedule, Step, train_loop
from lego.training.optim import param_groups
from lego.training.precision import DEFAULT_PRECISION, PRECISIONS, autocast, autocast_dtype
from lego.training.propagation import (
    block_input,
    collect_flops,
    evaluate,
    perplexity,
    propagate,
    propagate_to_file,
    score,
    stream_after,
    token_losses,
)
from lego.training.selection import calibrate_threshold, select_hard, select_hard_chunked
from lego.training.throughput import throughput
from lego.training_data import (
    StreamedTrainingData,
    TrainingData,
    load_mask,
    load_within_budget,
    save_mask,
    scratch_floats,
)

if TYPE_CHECKING:
    from lego.model import LEGOBlock


DUMP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # precisions of a written TrainingData


@dataclass
class StageTraining(Schedule):
    """What a `block_schedule` stage sets for LEGO's method: the loop's `Schedule` and the exit loss."""

    exit_loss_weight: float = 1.0
    soft_exit_labels: bool = False  # BCE target exp(-CE) instead of "argmax == target"

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        check_number(f"{prefix}exit_loss_weight", self.exit_loss_weight, low=0, hint="e.g. 1.0")


@dataclass
class FitConfig(LoopConfig, StageTraining):
    """Per-stage training settings (`lego.pipeline.config.fit_config` fills one per block): the loop's
    (`LoopConfig`), the stage's (`StageTraining`) and these."""

    eval_batch_size: int = 64
    hard_ratio: float | None = 0.5  # None: collect no hard tokens (the last block)
    hard_data_path: str | None = None  # write the hard tokens' TrainingData here, streamed (memory-mapped)
    hard_data_dtype: str = "float32"  # ... with hidden states in this precision: float32 | bfloat16 (half the bytes)
    memory_budget_mb: float | None = 0.0  # ... and read it back into memory if it fits, else map it (None: read)
    hard_mask_path: str | None = None  # or write only their mask here, 1 byte per token (trainer.dump=stream)
    precision: str = DEFAULT_PRECISION  # every forward's: auto (bf16 on CUDA, float32 elsewhere) | float32 | bf16
    fsdp: bool = False  # under torch.distributed: shard the block's layers while training (`lego.sharding`)

    def __post_init__(self) -> None:
        if self.hard_ratio is not None:
            check_hard_ratio(self.hard_ratio)
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.hard_data_dtype not in DUMP_DTYPES:
            raise ValueError(f"hard_data_dtype must be one of {', '.join(DUMP_DTYPES)}, got {self.hard_data_dtype!r}")


def check_hard_ratio(ratio: float, key: str = "hard_ratio") -> None:
    """The one range check of a hard ratio (`FitConfig` and the pipeline's config validation both call it): a share
    of the tokens strictly between 0 and 1; `key` names it in the error."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise ConfigError(f"{key}={ratio} must be a number in (0, 1): the share of tokens passed on as hard")


@dataclass
class FitStats:
    evals: list[dict] = field(default_factory=list)  # one row per validation: step, epoch, losses, PPLs
    best_eval: int = -1
    best_val_ppl: float = float("nan")
    stopped_early: bool = False
    train_tokens: int = 0  # active training tokens seen (token-passes through the block)
    train_flops: float = 0.0  # forward + backward (3x forward), K/V of kept context tokens included
    collect_flops: float = 0.0  # the forward over the training data that scores tokens for the next block
    stream_flops: float = 0.0  # streamed inputs (trainer.dump=stream): the frozen earlier blocks' forward
    stream_seconds: float = 0.0  # ... its time (this process's)
    stream_windows: int = 0  # ... and the windows it ran
    active_tokens: int = 0  # active tokens in the stage's training data
    hard_count: int = 0
    threshold: float | None = None
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0  # the training loop's (validations included), earlier processes of a resume too
    tokens_per_second: float | None = None  # train_tokens / train_seconds
    mfu: float | None = None  # train_flops / train_seconds over the devices' bf16 peak (lego.training.throughput)
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
        self.all_active = bool(train.active.all())  # Block 0's: every batch runs dense, no mask read per step

    def param_groups(self, config: FitConfig) -> list[dict]:
        return param_groups(self.modules, config.weight_decay)

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        return self.block.named_moe_ffns()

    def step(self, batch: TrainingData, epoch: int) -> Step:
        loss, lm_loss, exit_loss, n_tokens = train_step(
            self.block, batch, self.embedding, self.config, self.device, all_active=self.all_active
        )
        flops = 3 * self.block.forward_flops(n_tokens, batch.targets.numel(), self.train.seq_len, n_tokens)
        return Step(loss, lm_loss, exit_loss, n_tokens, [flops])

    def validate(self, period: Period) -> dict:
        """The validation loss with the LM loss of every training step since the previous one (the training curve
        between validation points)."""
        result = evaluate(self.block, self.val, self.embedding, self.config.eval_batch_size, self.config.precision)
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
    param_dtype = autocast_dtype(block.exit_classifier.weight.device, config.precision)
    sharded = ShardedLayers(block, param_dtype) if config.fsdp and distributed.world()[1] > 1 else None
    result = train_loop(BlockMethod(block, train, val, config, embedding), config, sharded=sharded, callback=callback)
    stats = FitStats(
        evals=result.evals, best_eval=result.best_eval, stopped_early=result.stopped_early,
        train_tokens=result.train_tokens, train_flops=result.train_flops[0], moe=result.moe,
        active_tokens=int(distributed.global_sum(len(train))),
        best_val_ppl=result.evals[result.best_eval]["val_ppl"] if result.evals else float("nan"),
        train_seconds=result.seconds,
        **throughput(result.train_tokens, result.train_flops[0], result.seconds, block.exit_classifier.weight.device,
                     distributed.world()[1]),
    )  # fmt: skip
    block.eval()
    hard_data = None
    if config.hard_ratio is not None:
        calibrate(block, val, embedding, config, stats)
        hard_data = collect_hard(block, train, embedding, config)
        stats.hard_count = int(distributed.global_sum(len(hard_data)))
        stats.collect_flops = distributed.global_sum(collect_flops(block, train))
    if isinstance(train, StreamedTrainingData):  # its inputs, made for every batch of training and collection
        stats.stream_flops = distributed.global_sum(train.prefix.flops)
        stats.stream_seconds, stats.stream_windows = train.prefix.seconds, train.prefix.windows
    stats.seconds = time.perf_counter() - started
    return hard_data, stats


def calibrate(block: LEGOBlock, val: TrainingData, embedding: nn.Embedding | None, config: FitConfig, stats: FitStats):
    """Set the block's threshold so that about `1 - hard_ratio` of every rank's validation tokens exit there."""
    local_conf = evaluate(block, val, embedding, config.eval_batch_size, config.precision)["confidence"]
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
    or streamed to `config.hard_data_path` and read back in memory or memory-mapped, or made per batch from the
    mask written to `config.hard_mask_path` (`stream_hard`)."""
    if config.hard_mask_path is not None:
        return stream_hard(block, train, embedding, config)
    forwards = autocast(block.exit_classifier.weight.device, config.precision)
    if config.hard_data_path is None:
        with forwards:
            hidden, confidence, _ = propagate(block, train, embedding, config.eval_batch_size)
        return TrainingData(hidden, train.targets, select_hard(confidence, train.active, config.hard_ratio))

    def pick_hard(confidence: Tensor, _: Tensor) -> Tensor:
        return select_hard(confidence, train.active, config.hard_ratio)

    dtype = DUMP_DTYPES[config.hard_data_dtype]
    with forwards:
        propagate_to_file(block, train, embedding, config.eval_batch_size, config.hard_data_path, pick_hard, dtype)
    return load_within_budget(config.hard_data_path, config.memory_budget_mb)


def stream_hard(
    block: LEGOBlock, train: TrainingData, embedding: nn.Embedding | None, config: FitConfig
) -> StreamedTrainingData:
    """`trainer.dump=stream`'s hand-off: one pass scores every active training token (its confidence spilled to a
    float32 scratch file beside the mask), the hard ones are chosen from it a chunk at a time
    (`select_hard_chunked`), and only their mask is kept, 1 byte per token; the next block's inputs are made from
    it batch by batch (`stream_after`)."""
    path, shape = config.hard_mask_path, (train.num_sequences, train.seq_len)
    with scratch_floats(path, shape) as confidence:
        with autocast(block.exit_classifier.weight.device, config.precision):
            score(block, train, embedding, config.eval_batch_size, confidence)
        save_mask(path, select_hard_chunked(confidence, train.active, config.hard_ratio), shape)
    release_freed_memory()  # the selection's chunked temporaries
    return stream_after(block, train, embedding, load_mask(path), config.precision)


def train_step(
    block: LEGOBlock,
    batch: TrainingData,
    embedding: nn.Embedding | None,
    config: FitConfig,
    device: torch.device,
    *,
    all_active: bool = False,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One batch's losses; `all_active`: every token of `batch` is active, so `block.run` takes the dense path
    without reading the mask (a host sync on a device)."""
    weight = block.exit_classifier.weight  # never sharded (FSDP shards the layers only)
    with autocast(device, config.precision):
        active = None if all_active else batch.active.to(device, non_blocking=True)
        out = block.run(block_input(batch, embedding, weight), active, logits_for="active")
    ce, right = token_losses(out, batch.targets.to(device, non_blocking=True))  # losses in float32 either way
    lm_loss = ce.mean()
    labels = torch.exp(-ce.detach()) if config.soft_exit_labels else right.float()
    exit_logit = out.exit_logit.reshape(-1).index_select(0, out.logits_index)
    exit_loss = F.binary_cross_entropy_with_logits(exit_logit.float(), labels)
    loss = lm_loss + config.exit_loss_weight * exit_loss
    moe_loss = block.moe_aux_loss()  # MoE layers' load-balancing and router z-losses, over the routed tokens
    if moe_loss is not None:
        loss = loss + moe_loss
    return loss, lm_loss.detach(), exit_loss.detach(), ce.numel()
