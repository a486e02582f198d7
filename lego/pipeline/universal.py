"""`method=universal` in the Hydra runner: joint training of every layer (`lego.methods.universal`) as one stage,
`stage_0/`, run by the shared loop (`lego.training.loop`) like LEGO's stages.

The training settings are block_schedule.blocks[0]'s (epochs, lr, warmup_steps, min_lr_ratio, evals_per_epoch,
max_steps, batch_size); the other entries only give the depth (one layer each). There is no early stopping: the
last weights are kept. The `universal` node is a UniversalConfig (plus `preset`), checked by
`lego.methods.universal_config.from_dict`.

`stage_0/` holds, as LEGO's stages do:
  model.safetensors    the trained model (thresholds included)
  stats.json           written last: its presence marks the run's training complete (a re-run loads it);
                       per layer its stats (`blocks`), and per MoE layer its routing over the training
                       steps since the last resume (`moe`)
  checkpoint.pt        after each validation while training, the loop's one format (`lego.training.checkpoint`);
                       removed when training completes
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from lego.errors import TrainingDiverged
from lego.methods.universal import JointTraining, UniversalTrainer
from lego.methods.universal_config import from_dict
from lego.model import LEGOTransformer
from lego.pipeline.checks import warn_long_warmup
from lego.pipeline.config import RunConfig
from lego.pipeline.files import load_weights, read_json, save_weights, write_json
from lego.pipeline.progress import StageProgress
from lego.pipeline.staged import diverged, numeric_metrics
from lego.pipeline.tracking import Tracker
from lego.training.loop import LoopConfig, LoopResult, Method, Schedule, planned_steps, train_loop
from lego.training.throughput import throughput
from lego.training_data import TrainingData


def train_from_run(
    run: RunConfig, model: LEGOTransformer, train: TrainingData, val: TrainingData, run_dir: Path, tracker: Tracker
) -> list[dict]:
    """Train `model` jointly, set its routing, and return one stats dict per block (layer)."""
    config = from_dict(run.universal, len(model.blocks))
    trainer = UniversalTrainer(config, model.vocab_size, next(model.parameters()).device, run.trainer.precision)
    trainer.prepare(model)
    stage_dir = run_dir / "stage_0"
    if (stage_dir / "stats.json").is_file():
        load_weights(model, stage_dir / "model.safetensors")
        trainer.configure_routing(model)
        print(f"universal: training complete in {stage_dir}, loaded (delete the folder to retrain)")
        return read_json(stage_dir / "stats.json", {"blocks": list})["blocks"]

    epochs, batch = run.block_schedule.blocks[0].epochs, run.trainer.eval_batch_size

    def joint(total_steps: int) -> JointTraining:
        return JointTraining(trainer, model, train, val, epochs, batch, seed=run.seed, total_steps=total_steps)

    _, result = train_one_stage("universal", run, joint, train, stage_dir, tracker)
    trainer.configure_routing(model)
    blocks = layer_stats(result)
    speed = throughput(result.train_tokens, sum(result.train_flops), result.seconds, trainer.device)
    blocks[0].update(train_seconds=result.seconds, **speed)  # on the first layer, with the stage's time
    save_weights(model, stage_dir / "model.safetensors")
    write_json(stage_dir / "stats.json", {"method": "universal", "universal": run.universal, "blocks": blocks,
                                          "moe": result.moe})  # fmt: skip
    (stage_dir / "checkpoint.pt").unlink(missing_ok=True)
    tracker.log_stage_end(0, {**blocks[-1], "train_flops": sum(result.train_flops), **speed})
    print(
        f"universal: {result.steps} steps, {result.train_tokens:,} tokens, final-layer best val PPL "
        f"{blocks[-1]['best_val_ppl']:.2f}, {result.seconds:.0f}s"
    )
    return blocks


def train_one_stage(
    name: str, run: RunConfig, make_method: Callable[[int], Method], train: TrainingData, stage_dir: Path,
    tracker: Tracker,
) -> tuple[Method, LoopResult]:  # fmt: skip
    """A method that trains as one stage (`universal`, `mod`) through the shared loop: block_schedule.blocks[0]'s
    settings (`loop_config`), `make_method(planned steps)`, a progress bar logging to W&B, a resume from
    `stage_dir/checkpoint.pt`, and a divergence as the one line that says what to change."""
    stage = run.block_schedule.blocks[0]
    loop = loop_config(run, stage_dir / "checkpoint.pt")
    total_steps = planned_steps(train.num_batches(loop.batch_size), loop)
    warn_long_warmup(f"{name} training", "block_schedule.blocks[0]", stage.warmup_steps, total_steps)
    if Path(loop.checkpoint_path).is_file():
        print(f"{name}: resuming from {loop.checkpoint_path}")
    method = make_method(total_steps)
    progress = StageProgress(0, total_steps, run.trainer.progress, lambda e: tracker.log_step(0, numeric_metrics(e)))
    try:
        result = train_loop(method, loop, callback=progress)
    except TrainingDiverged as err:
        raise diverged(f"{name} training", err, "block_schedule.blocks[0].lr", stage.lr, run, stage_dir) from None
    finally:
        progress.close()
    return method, result


def loop_config(run: RunConfig, checkpoint: Path) -> LoopConfig:
    """The loop's settings from block_schedule.blocks[0] (its `Schedule`; the weight decay is the `universal` node's)
    and the trainer group; no early stopping."""
    stage = run.block_schedule.blocks[0]
    schedule = {f.name: getattr(stage, f.name) for f in fields(Schedule)}
    return LoopConfig(
        **{**schedule, "patience": None}, batch_size=stage.batch_size or run.data.batch_size, seed=run.seed,
        grad_clip=run.trainer.grad_clip, checkpoint_path=str(checkpoint),
        divergence_factor=run.trainer.divergence_factor, log_every_steps=run.trainer.log_every_steps,
        checkpoint_every_steps=run.trainer.checkpoint_every_steps,
    )  # fmt: skip


def layer_stats(result: LoopResult) -> list[dict]:
    """One stats dict per layer, as LEGO writes one per block: its evaluations and training FLOPs (the time and
    the tokens, shared by all layers, counted on the first)."""
    blocks = []
    for k, flops in enumerate(result.train_flops):
        evals = [row["layers"][k] for row in result.evals]
        blocks.append({
            "block": k, "layers": 1, "hard_ratio": None, "hard_count": None, "train_tokens": result.train_tokens,
            "train_flops": flops, "best_val_ppl": min((r["val_ppl"] for r in evals), default=math.nan),
            "seconds": result.seconds if k == 0 else 0.0, "evals": evals,
        })  # fmt: skip
    return blocks
