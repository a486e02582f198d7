"""LEGO's staged training: Block 0 on every training token, Block k on Block k-1's hard tokens.

Each stage leaves `stage_<k>/` in the run directory:
  model.safetensors         the whole model after the stage
  hard_tokens.safetensors   the TrainingData Block k+1 trains on (`TrainingData.load`); not for the last block.
                            With N ranks (torchrun) each writes its shard, hard_tokens.rank<r>-of<N>.safetensors
  val_routed.safetensors    the validation tokens routed on to Block k+1, only when larger than trainer.memory_budget_mb
  stats.json                written last: its presence marks the stage complete
  checkpoint.pt             while the stage runs (weights_only-loadable); removed when it completes
A re-run with the same run directory skips complete stages and resumes an interrupted one, on any
number of ranks: a complete stage's shards are read back re-sharded (`load_shard`). Under torchrun every
rank trains on its shard of the data (see `lego.fitting`); rank 0 alone writes the shared files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lego import distributed
from lego.fitting import route
from lego.model import LEGOTransformer
from lego.pipeline.config import RunConfig, fit_config, hard_ratios
from lego.pipeline.files import load_weights, read_json, save_weights, write_json
from lego.pipeline.progress import StageProgress
from lego.pipeline.tracking import Tracker
from lego.training_data import TrainingData, dump_bytes, exceeds_budget, load_shard, shard_path


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
    results: list[StageResult] = []
    for k, block in enumerate(model.blocks):
        last = k == len(model.blocks) - 1
        stage_dir = run_dir / f"stage_{k}"
        embedding = model.embedding if k == 0 else None
        hard_path = stage_dir / "hard_tokens.safetensors"
        if distributed.broadcast_object((stage_dir / "stats.json").is_file()):  # rank 0 decides for all
            load_weights(model, stage_dir / "model.safetensors")
            stats = read_json(stage_dir / "stats.json")
            print(f"stage {k}: complete in {stage_dir}, loaded (delete the folder to retrain it)")
            budget = run.trainer.memory_budget_mb
            hard = None if last else load_shard(hard_path, stats.get("ranks", 1), rank, world, budget)
            results.append(StageResult(stats, resumed=True))
        else:
            active_share = distributed.global_sum(len(train)) / distributed.global_sum(train.targets.numel())
            config = fit_config(run, k, None if last else ratios[k], str(stage_dir / "checkpoint.pt"), active_share)
            # streamed to disk, read back within trainer.memory_budget_mb; one shard per rank
            config.hard_data_path = None if last else str(shard_path(hard_path, rank, world))
            progress = StageProgress(
                k,
                _total_steps(train, distributed.per_rank(config.batch_size), config.epochs, config.max_steps),
                run.trainer.progress,
                on_event=lambda event, k=k: tracker.log_step(k, numeric_metrics(event)),
            )
            try:
                hard, fit_stats = block.fit(train, val, config, embedding=embedding, callback=progress)
            finally:
                progress.close()
            stats = {
                "block": k,
                "layers": block.num_layers,
                "hard_ratio": None if last else ratios[k],
                "train_sequences": int(distributed.global_sum(train.num_sequences)),
                "ranks": world,  # how many shards hard_tokens was written as
                **fit_stats.as_dict(),
            }
            distributed.barrier()  # every rank's shard is on disk before stats.json marks the stage complete
            if distributed.is_main():
                save_weights(model, stage_dir / "model.safetensors")
                write_json(stage_dir / "stats.json", stats)
                (stage_dir / "checkpoint.pt").unlink(missing_ok=True)
            tracker.log_stage_end(k, stats)
            results.append(StageResult(stats, resumed=False))
            print(_stage_line(k, stats))
        if not last:
            # Validation for the next stage: the tokens inference would send on (threshold routing).
            routed_path = shard_path(stage_dir / "val_routed.safetensors", rank, world)
            stream = exceeds_budget(dump_bytes(val.num_sequences, val.seq_len, block.dim), run.trainer.memory_budget_mb)
            val = route(block, val, embedding, run.trainer.eval_batch_size, routed_path if stream else None)
            train = hard
    return results


def _total_steps(data: TrainingData, batch_size: int, epochs: int, max_steps: int | None) -> int:
    steps = data.num_batches(batch_size) * epochs
    return min(steps, max_steps) if max_steps is not None else steps


def numeric_metrics(event: dict) -> dict[str, float]:
    """The numbers of a fit callback event (what W&B can chart)."""
    return {k: v for k, v in event.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stage_line(k: int, stats: dict) -> str:
    parts = [f"stage {k}: best val PPL {stats['best_val_ppl']:.2f}", f"{stats['train_tokens']:,} token passes"]
    if stats.get("threshold") is not None:
        parts.append(f"threshold {stats['threshold']:.3f}, {stats['hard_count']:,} hard tokens")
    parts.append(f"{stats['seconds']:.0f}s")
    return ", ".join(parts)


def dense_compute_reference(model: LEGOTransformer, train_tokens: int, seq_len: int) -> float:
    """Training FLOPs of one dense pass of every layer over `train_tokens` (3x forward), head included:
    the yardstick for a run's training compute."""
    flops = sum(block.forward_flops(train_tokens, train_tokens, seq_len) for block in model.blocks)
    return 3 * (flops + train_tokens * 2 * model.dim * model.vocab_size)
