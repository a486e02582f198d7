"""LEGO's staged training: Block 0 on every training token, Block k on Block k-1's hard tokens.

Each stage leaves `stage_<k>/` in the run directory:
  model.safetensors         the whole model after the stage
  hard_tokens.safetensors   the TrainingData Block k+1 trains on (`TrainingData.load`); not for the last block.
                            Hidden states in `trainer.dump_dtype`. With N ranks (torchrun) each writes its
                            shard, hard_tokens.rank<r>-of<N>.safetensors. `trainer.dump=delete` (what `auto`, the
                            default, does in a multirun) removes it once stage k+1 is complete;
                            `trainer.dump=none` and `stream` never write it, but
  hard_mask.safetensors     (`trainer.dump=none` only) the token ids with Block k+1's hard tokens as the active
                            mask, from which a resume recomputes Block k+1's inputs (blocks 0..k on the ids)
  hard_mask.npy             (`trainer.dump=stream` only) Block k+1's hard tokens, 1 byte per training token (one
                            shard per rank, as the dump): Block k+1's inputs are made from the token ids for every
                            batch by the frozen blocks 0..k (`StreamedTrainingData`), in training and on a resume
  val_routed.safetensors    the validation tokens routed on to Block k+1, only when larger than trainer.memory_budget_mb
  stats.json                written last: its presence marks the stage complete
  checkpoint.pt             while the stage runs (weights_only-loadable); removed when it completes
A re-run with the same run directory skips complete stages and resumes an interrupted one, on any
number of ranks: a complete stage's shards are read back re-sharded (`load_shard`, `load_mask_shard`), and only the
ones the first incomplete stage needs. A resume reads whichever of hard_tokens or hard_mask a stage left, so
`trainer.dump` may change between a run and its resume. Under torchrun every rank trains on its shard of the data (see
`lego.fitting`); rank 0 alone writes the shared files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from torch import nn

from lego import distributed
from lego.errors import ConfigError, TrainingDiverged
from lego.model import LEGOBlock, LEGOTransformer
from lego.pipeline.checks import warn_long_warmup
from lego.pipeline.config import RunConfig, fit_config, hard_ratios
from lego.pipeline.files import load_weights, read_json, save_weights, write_json
from lego.pipeline.plan import plan_run, planned_passes
from lego.pipeline.progress import StageProgress
from lego.pipeline.tracking import Tracker
from lego.training.loop import planned_steps
from lego.training.precision import autocast
from lego.training.propagation import propagate, stream_after
from lego.training.routing import route
from lego.training_data import TrainingData, dump_bytes, exceeds_budget, load_mask_shard, load_shard, shard_path

# Stage metrics measured on the stage's own tokens: from stage 1 on, the tokens the previous block passes on.
TOKEN_METRICS = ("loss", "lm_loss", "exit_loss", "train_loss", "train_ppl", "val_loss", "val_ppl", "val_acc",
                 "best_val_ppl")  # fmt: skip


MASKS = ("mask", "stream")  # the saved inputs made from the stage's own inputs (`_saved_inputs`)
STATS_KEYS = {"block": int, "best_val_ppl": (int, float), "train_tokens": int, "seconds": (int, float), "evals": list}


def diverged(
    where: str, err: TrainingDiverged, lr_key: str, lr: float, run: RunConfig, stage_dir: Path
) -> TrainingDiverged:
    """The one line for a stage that diverged: where, the loss and step, and what to change."""
    kept = stage_dir / "checkpoint.pt"
    checkpoint = f"; its last good checkpoint stays in {kept}" if kept.is_file() else ""
    return TrainingDiverged(
        f"{where} diverged: {err}; lower {lr_key} (now {lr:g}) or trainer.grad_clip (now {run.trainer.grad_clip:g}), "
        f"or raise trainer.divergence_factor (now {run.trainer.divergence_factor}), and train in a new "
        f"hydra.run.dir{checkpoint}"
    )


@dataclass
class StageResult:
    stats: dict
    resumed: bool  # loaded from a complete stage folder instead of trained


def train_staged(
    run: RunConfig,
    model: LEGOTransformer,
    train: TrainingData,
    val: TrainingData,
    run_dir: Path,
    tracker: Tracker,
) -> list[StageResult]:
    ratios = hard_ratios(run)
    rank, world = distributed.world()
    dump, budget = _dump_mode(run.trainer.dump, len(model.blocks)), run.trainer.memory_budget_mb
    precision = run.trainer.precision  # every forward's (`lego.training.precision`)
    token_ids = train  # Block 0's data: what a missing dump's inputs are recomputed from
    stage_dirs = [run_dir / f"stage_{k}" for k in range(len(model.blocks))]
    # rank 0 decides for all which stages are complete and what each left for the next one
    complete = distributed.broadcast_object([(path / "stats.json").is_file() for path in stage_dirs])
    saved = distributed.broadcast_object([_saved_inputs(path) for path in stage_dirs])
    needed = _inputs_needed(complete, saved)
    _check_inputs_available(stage_dirs, needed, saved)
    recomputes = any(need and kind == "mask" for need, kind in zip(needed, saved, strict=True))
    if (dump == "none" and len(model.blocks) > 1) or recomputes:
        _check_recompute_fits(train, model.dim, budget)
    if not all(complete):
        for line in _plan(run, model, train, ratios, dump, run_dir).lines():
            print(line)
    results: list[StageResult] = []
    for k, block in enumerate(model.blocks):
        last = k == len(model.blocks) - 1
        stage_dir = stage_dirs[k]
        embedding = model.embedding if k == 0 else None
        hard_path = stage_dir / "hard_tokens.safetensors"
        mask_path = stage_dir / "hard_mask.safetensors"
        stream_path = stage_dir / "hard_mask.npy"
        if complete[k]:
            load_weights(model, stage_dir / "model.safetensors")
            stats = read_json(stage_dir / "stats.json", STATS_KEYS)
            print(f"stage {k}: complete in {stage_dir}, loaded (delete the folder to retrain it)")
            hard = None  # the next stage's inputs: only while a later stage still has to train
            saved_world = stats.get("ranks", 1)
            if needed[k] and saved[k] == "dump":
                hard = load_shard(hard_path, saved_world, rank, world, budget)
            elif needed[k] and saved[k] == "stream":  # made per batch from the stage's own inputs and its mask
                mask = load_mask_shard(stream_path, saved_world, rank, world)
                hard = stream_after(block, train, embedding, mask, precision)
            elif needed[k]:  # a mask (checked above): recomputed along the chain of complete stages
                mask = load_shard(mask_path, saved_world, rank, world, None)
                hard = _recompute_hard(k, block, train, embedding, mask, run.trainer.eval_batch_size, precision)
            results.append(StageResult(stats, resumed=True))
        else:
            active_share = distributed.global_sum(len(train)) / distributed.global_sum(train.targets.numel())
            config = fit_config(run, k, None if last else ratios[k], str(stage_dir / "checkpoint.pt"), active_share)
            # streamed to disk, read back within trainer.memory_budget_mb (or only the mask); one shard per rank
            hand_off = str(shard_path(stream_path if dump == "stream" else hard_path, rank, world))
            config.hard_data_path = None if last or dump in ("none", "stream") else hand_off
            config.hard_mask_path = hand_off if dump == "stream" and not last else None
            config.hard_data_dtype = run.trainer.dump_dtype
            total_steps = planned_steps(train.num_batches(distributed.per_rank(config.batch_size)), config)
            warn_long_warmup(f"stage {k}", f"block_schedule.blocks[{k}]", config.warmup_steps, total_steps)
            progress = StageProgress(
                k,
                total_steps,
                run.trainer.progress,
                on_event=lambda event, k=k: tracker.log_step(k, stage_metrics(k, numeric_metrics(event))),
            )
            try:
                hard, fit_stats = block.fit(train, val, config, embedding=embedding, callback=progress)
            except TrainingDiverged as err:
                raise diverged(f"stage {k}", err, f"block_schedule.blocks[{k}].lr", config.lr, run, stage_dir) from None
            finally:
                progress.close()
            if hard is not None and dump == "none":
                TrainingData(None, token_ids.targets, hard.active, token_ids.input_ids).save(
                    shard_path(mask_path, rank, world)
                )
            stats = {
                "block": k,
                "layers": block.num_layers,
                "hard_ratio": None if last else ratios[k],
                "train_sequences": int(distributed.global_sum(train.num_sequences)),
                "ranks": world,  # how many shards hard_tokens was written as
                # the validation tokens this stage is measured on: all of them for Block 0, then the ones
                # the previous block passes on (its best_val_ppl is over those harder tokens only)
                "val_token_share": distributed.global_sum(len(val)) / distributed.global_sum(val.targets.numel()),
                **fit_stats.as_dict(),
            }
            distributed.barrier()  # every rank's shard is on disk before stats.json marks the stage complete
            if distributed.is_main():
                save_weights(model, stage_dir / "model.safetensors")
                write_json(stage_dir / "stats.json", stats)
                (stage_dir / "checkpoint.pt").unlink(missing_ok=True)
            tracker.log_stage_end(k, stage_metrics(k, stats))
            results.append(StageResult(stats, resumed=False))
            print(_stage_line(k, stats, total_steps, config.patience))
        if dump == "delete" and distributed.is_main():
            _delete_unneeded_inputs(stage_dirs, k)
        if not last:
            # Validation for the next stage: the tokens inference would send on (threshold routing).
            routed_path = shard_path(stage_dir / "val_routed.safetensors", rank, world)
            stream = exceeds_budget(dump_bytes(val.num_sequences, val.seq_len, block.dim), budget)
            val = route(block, val, embedding, run.trainer.eval_batch_size, routed_path if stream else None, precision)
            train = hard
    return results


def _dump_mode(configured: str, blocks: int) -> str:
    """What `trainer.dump` does: `auto` (the default) keeps the dumps in a single run and deletes them in a Hydra
    multirun, where every job's would add up unannounced (a `small` job's is 495 MB) and no resume needs them
    once the next stage is complete. The one place that reads Hydra's run mode; keep without Hydra."""
    if configured != "auto":
        return configured
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return "keep"
    if blocks > 1:
        print(
            "trainer.dump=delete, the default in a sweep: each stage's hard-token dump is deleted once the next "
            "stage is complete (trainer.dump=keep keeps them)"
        )
    return "delete"


def _saved_inputs(stage_dir: Path) -> str | None:
    """What a stage left of the next block's inputs: "dump" (hard_tokens), "mask" (hard_mask.safetensors: token ids
    and the hard tokens, `trainer.dump=none`), "stream" (hard_mask.npy: the hard tokens, `trainer.dump=stream`) or
    None (the last block, or a dump `trainer.dump=delete` removed)."""
    if any(stage_dir.glob("hard_tokens*.safetensors")):
        return "dump"
    if any(stage_dir.glob("hard_mask*.safetensors")):
        return "mask"
    return "stream" if any(stage_dir.glob("hard_mask*.npy")) else None


def _inputs_needed(complete: list[bool], saved: list[str | None]) -> list[bool]:
    """Which complete stages must rebuild the next block's inputs on a resume: the one before the first
    incomplete stage, and, going back, each one whose next stage left only a mask to recompute or stream from.
    Decided from the files, not from `trainer.dump`, so a resume may switch between keep, delete, none and stream."""
    needed = [False] * len(complete)
    if all(complete):
        return needed  # nothing left to train
    first_incomplete = complete.index(False)
    for k in range(first_incomplete - 1, -1, -1):
        needed[k] = k == first_incomplete - 1 or (needed[k + 1] and saved[k + 1] in MASKS)
    return needed


def _check_inputs_available(stage_dirs: list[Path], needed: list[bool], saved: list[str | None]) -> None:
    """Before any work: every complete stage a resume rebuilds the next block's inputs from still holds them.
    If one does not, name the earliest stage folder to delete: the first one whose own inputs can be rebuilt."""
    for k, need in enumerate(needed):
        if need and saved[k] is None:
            j = k
            while j > 0 and not _rebuildable(saved, j - 1):
                j -= 1
            raise ConfigError(
                f"{stage_dirs[k]} holds neither hard_tokens nor hard_mask, which Block {k + 1}'s inputs are made "
                f"from; delete {stage_dirs[j].name} and the later stage folders to retrain from there"
            )


def _rebuildable(saved: list[str | None], k: int) -> bool:
    """Whether stage k's files give the next block's inputs: its dump, or its mask plus its own inputs."""
    return saved[k] == "dump" or (saved[k] in MASKS and (k == 0 or _rebuildable(saved, k - 1)))


def _delete_unneeded_inputs(stage_dirs: list[Path], k: int) -> None:
    """`trainer.dump=delete`, once stage k is complete: remove every earlier stage's dump or mask that no resume
    can need: all but the chain the first incomplete stage's inputs are rebuilt from (`_inputs_needed`)."""
    complete = [(path / "stats.json").is_file() for path in stage_dirs]
    needed = _inputs_needed(complete, [_saved_inputs(path) for path in stage_dirs])
    for j in range(k):
        if not needed[j]:
            for pattern in ("hard_tokens*.safetensors", "hard_mask*.safetensors", "hard_mask*.npy"):
                for path in stage_dirs[j].glob(pattern):
                    path.unlink()


def _plan(run: RunConfig, model: LEGOTransformer, train: TrainingData, ratios: list[float], dump: str, run_dir: Path):
    """The run's plan (`lego.pipeline.plan`) over every rank's training tokens, with each stage's planned passes
    (its batch size as `fit_config` sets it from the tokens reaching it); refused when the disk cannot hold it."""
    tokens = int(distributed.global_sum(len(train)))
    sequences = int(distributed.global_sum(train.num_sequences))
    passes, share = [], 1.0
    for k, stage in enumerate(run.block_schedule.blocks):
        batch = stage.batch_size or max(1, round(run.data.batch_size / share))
        passes.append(planned_passes(sequences, batch, stage.epochs, stage.max_steps))
        share *= ratios[k] if k < len(ratios) else 1.0
    trainer = replace(run.trainer, dump=dump)
    return plan_run(model, tokens, train.seq_len, ratios, passes, trainer, run_dir)


def _check_recompute_fits(train: TrainingData, dim: int, budget: float | None) -> None:
    """`dump=none` holds the next stage's inputs in memory, float32: refuse before any work when they
    would not fit `trainer.memory_budget_mb`."""
    nbytes = dump_bytes(train.num_sequences, train.seq_len, dim)
    if exceeds_budget(nbytes, budget):
        raise ConfigError(
            f"trainer.dump=none holds the next stage's inputs in memory ({nbytes / 2**20:.0f} MB per rank), more "
            f"than trainer.memory_budget_mb={budget}; use trainer.dump=stream or delete, or raise the budget"
        )


def _recompute_hard(
    k: int,
    block: LEGOBlock,
    train: TrainingData,
    embedding: nn.Embedding | None,
    mask: TrainingData,
    batch_size: int,
    precision: str,
) -> TrainingData:
    """Block k+1's inputs without a dump (`trainer.dump=none`): the frozen Block k run again over its own
    inputs (token ids for Block 0, recomputed the same way for later blocks), with the hard tokens stored
    in `mask` as the active ones: the tokens the stage chose, not a new choice that float rounding could
    change at the ratio's boundary."""
    started = time.perf_counter()
    with autocast(block.exit_classifier.weight.device, precision):  # as the stage collected them
        hidden, _, _ = propagate(block, train, embedding, batch_size)
    print(f"stage {k}: recomputed Block {k + 1}'s inputs from the token ids in {time.perf_counter() - started:.0f}s")
    return TrainingData(hidden, train.targets, mask.active)


def numeric_metrics(event: dict) -> dict[str, float]:
    """The numbers of a fit callback event (what W&B can chart)."""
    return {k: v for k, v in event.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_metrics(k: int, metrics: dict) -> dict:
    """Stage k's metrics as W&B names them: from stage 1 on, losses, PPLs and accuracies are over the tokens
    the previous block passes on, the hard ones, and say so (`stage_1/val_ppl_hard_tokens`), so that nobody
    reads stage 1's higher PPL as a regression from stage 0's."""
    if k == 0:
        return metrics
    return {f"{key}_hard_tokens" if key in TOKEN_METRICS else key: value for key, value in metrics.items()}


def _stage_line(k: int, stats: dict, total_steps: int, patience: int) -> str:
    if k == 0:
        measured_on = "all validation tokens"
    else:
        share = stats["val_token_share"]
        measured_on = f"only the {share:.1%} of validation tokens Block {k - 1} passes on, its hard ones"
    parts = [
        f"stage {k}: best val PPL {stats['best_val_ppl']:.2f} ({measured_on})",
        f"{stats['train_tokens']:,} token passes",
    ]
    if stats.get("threshold") is not None:
        parts.append(f"threshold {stats['threshold']:.3f}, {stats['hard_count']:,} hard tokens")
    steps = stats["evals"][-1]["step"] if stats["evals"] else 0
    if stats["stopped_early"] and steps < total_steps:
        parts.append(f"stopped early after {steps:,} of {total_steps:,} steps (patience {patience})")
    parts.append(f"{stats['seconds']:.0f}s")
    return ", ".join(parts)


def dense_compute_reference(model: LEGOTransformer, train_tokens: int, seq_len: int) -> float:
    """Training FLOPs of one dense pass of every layer over `train_tokens` (3x forward), head included:
    the yardstick for a run's training compute."""
    flops = sum(block.forward_flops(train_tokens, train_tokens, seq_len) for block in model.blocks)
    return 3 * (flops + train_tokens * 2 * model.dim * model.vocab_size)
