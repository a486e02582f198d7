"""`method=universal` in the Hydra runner: joint training of every layer as one stage, `stage_0/`.

The training settings are block_schedule.blocks[0]'s (epochs, lr, warmup_steps, min_lr_ratio,
evals_per_epoch, max_steps, batch_size); the other entries only give the depth (one layer each). The
`universal` node is a UniversalConfig (plus `preset`), checked by `experiments.universal.config.from_dict`.

`stage_0/` holds, as LEGO's stages do:
  model.safetensors    the trained model (thresholds included)
  stats.json           written last: its presence marks the run's training complete (a re-run loads it);
                       per layer its stats (`blocks`), and per MoE layer its routing over the training
                       steps since the last resume (`moe`)
  checkpoint.*         after each epoch while training (weights as safetensors, optimizer state as plain
                       tensors loadable with weights_only=True); removed when training completes
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from experiments.universal.config import from_dict
from experiments.universal.trainer import UniversalTrainer
from lego.atomic import atomic_write
from lego.errors import TrainingDiverged
from lego.fitting import DivergenceGuard, FitConfig, load_checkpoint, lr_schedule, perplexity
from lego.model import LEGOTransformer
from lego.moe import RoutingTally, step_routing_metrics
from lego.pipeline.checks import warn_long_warmup
from lego.pipeline.config import RunConfig
from lego.pipeline.files import load_weights, read_json, save_weights, write_json
from lego.pipeline.progress import StageProgress
from lego.pipeline.staged import diverged, numeric_metrics
from lego.pipeline.tracking import Tracker
from lego.training_data import TrainingData


def train_from_run(
    run: RunConfig, model: LEGOTransformer, train: TrainingData, val: TrainingData, run_dir: Path, tracker: Tracker
) -> list[dict]:
    """Train `model` jointly, set its routing, and return one stats dict per block (layer)."""
    config = from_dict(run.universal, len(model.blocks))
    device = next(model.parameters()).device
    trainer = UniversalTrainer(config, model.vocab_size, device)
    trainer.prepare(model)
    stage_dir = run_dir / "stage_0"
    if (stage_dir / "stats.json").is_file():
        load_weights(model, stage_dir / "model.safetensors")
        trainer.configure_routing(model)
        print(f"universal: training complete in {stage_dir}, loaded (delete the folder to retrain)")
        return read_json(stage_dir / "stats.json", {"blocks": list})["blocks"]

    stage = run.block_schedule.blocks[0]
    batch_size = stage.batch_size or run.data.batch_size
    steps_per_epoch = train.num_batches(batch_size)
    total_steps = steps_per_epoch * stage.epochs
    if stage.max_steps is not None:
        total_steps = min(total_steps, stage.max_steps)
    warn_long_warmup("universal training", "block_schedule.blocks[0]", stage.warmup_steps, total_steps)
    eval_every = max(1, steps_per_epoch // stage.evals_per_epoch)
    optimizer = trainer.create_optimizer(model, stage.lr)
    schedule = FitConfig(warmup_steps=stage.warmup_steps, min_lr_ratio=stage.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(schedule, total_steps))
    n_layers, seq_len = len(model.blocks), train.seq_len
    state = {"epoch": 0, "step": 0, "tokens": 0, "flops": [0.0] * n_layers, "evals": [], "seconds": 0.0}
    checkpoint = stage_dir / "checkpoint.pt"
    if checkpoint.is_file():
        load_weights(model, stage_dir / "checkpoint.safetensors")
        saved = load_checkpoint(checkpoint, device, keys=("optimizer", "scheduler", "state"))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        print(f"universal: resuming after epoch {state['epoch'] - 1} from {checkpoint}")

    started = time.perf_counter() - state["seconds"]
    guard = DivergenceGuard(run.trainer.divergence_factor, state.get("start_loss"))
    progress = StageProgress(
        0, total_steps, run.trainer.progress, lambda event: tracker.log_step(0, numeric_metrics(event))
    )
    running: dict[str, float] = {}

    def validate(epoch: int) -> None:
        """One row per layer: its own train loss since the last validation and its val loss/PPL/acc."""
        metrics = trainer.layer_metrics(model, val, run.trainer.eval_batch_size)
        rows = []
        for i, layer in metrics.items():
            train_loss = running.get(f"layer{i}_loss", 0.0) / max(running.get("tokens", 0.0), 1.0)
            rows.append({
                "step": state["step"], "epoch": epoch, "train_loss": train_loss,
                "train_ppl": perplexity(train_loss), "val_loss": layer["loss"], "val_ppl": layer["ppl"],
                "val_acc": layer["acc"],
            })  # fmt: skip
        state["evals"].append(rows)
        running.clear()
        final = rows[-1]
        progress({"kind": "eval", **final, **{f"val_ppl_layer{r + 1}": row["val_ppl"] for r, row in enumerate(rows)}})

    # per MoE layer, its routing over the training steps this process ran, i.e. since the last resume, as in
    # LEGO's stages ([] for a dense model)
    tally = RoutingTally(model.named_moe_ffns(), training=True)
    moe_ffns = list(tally.ffns.values())
    try:
        while state["epoch"] < stage.epochs and state["step"] < total_steps:
            epoch = state["epoch"]
            logit_layers = trainer.logit_layers(n_layers, trainer.layer_weights(epoch, stage.epochs, n_layers))

            def on_step(event: dict, epoch: int = epoch, logit_layers: set[int] = logit_layers) -> None:
                state["step"] += 1
                guard.check(state["step"], event["lm_loss"])
                state["start_loss"] = guard.start
                n = event["tokens"]
                state["tokens"] += n
                for k, block in enumerate(model.blocks):
                    n_logits = n if k + 1 in logit_layers else 0
                    state["flops"][k] += 3 * block.forward_flops(n, n, seq_len, n_logits)
                for key, value in event.items():
                    if key.endswith("_loss"):
                        running[key] = running.get(key, 0.0) + value * n
                running["tokens"] = running.get("tokens", 0.0) + n
                progress({**event, "step": state["step"], **step_routing_metrics(moe_ffns)})
                if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                    validate(epoch)

            try:
                trainer.train_epoch(
                    model, train, optimizer, epoch, stage.epochs, batch_size=batch_size, scheduler=scheduler,
                    grad_clip=run.trainer.grad_clip, seed=run.seed, max_steps=total_steps - state["step"],
                    callback=on_step,
                )  # fmt: skip
            except TrainingDiverged as err:
                lr_key = "block_schedule.blocks[0].lr"
                raise diverged("universal training", err, lr_key, stage.lr, run, stage_dir) from None
            if state["evals"][-1:] and state["evals"][-1][0]["step"] != state["step"]:
                validate(epoch)  # the epoch's last, partial period
            state["epoch"] = epoch + 1
            state["seconds"] = time.perf_counter() - started
            save_weights(model, stage_dir / "checkpoint.safetensors")
            saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state}
            atomic_write(checkpoint, lambda tmp, saved=saved: torch.save(saved, tmp))
        moe = tally.summary(reduce=True)
    finally:
        tally.close()
        progress.close()

    trainer.configure_routing(model)
    seconds = time.perf_counter() - started
    blocks = []
    for k in range(n_layers):
        evals = [rows[k] for rows in state["evals"]]
        blocks.append({
            "block": k, "layers": 1, "hard_ratio": None, "hard_count": None, "train_tokens": state["tokens"],
            "train_flops": state["flops"][k], "best_val_ppl": min((r["val_ppl"] for r in evals), default=math.nan),
            "seconds": seconds if k == 0 else 0.0, "evals": evals,
        })  # fmt: skip
    save_weights(model, stage_dir / "model.safetensors")
    stats = {"method": "universal", "universal": run.universal, "blocks": blocks, "moe": moe}
    write_json(stage_dir / "stats.json", stats)
    for name in ("checkpoint.pt", "checkpoint.safetensors"):
        (stage_dir / name).unlink(missing_ok=True)
    tracker.log_stage_end(0, {**blocks[-1], "train_flops": sum(state["flops"])})
    print(
        f"universal: {state['step']} steps, {state['tokens']:,} tokens, final-layer best val PPL "
        f"{blocks[-1]['best_val_ppl']:.2f}, {seconds:.0f}s"
    )
    return blocks
