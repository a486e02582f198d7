"""`method=mod` in the Hydra runner: Mixture-of-Depths (`lego.methods.mod`) trained as one stage, `stage_0/`, by the
shared loop (`lego.training.loop`), as `method=universal` is (`lego.pipeline.universal`, whose loop settings it
takes: block_schedule.blocks[0]'s, no early stopping, the last weights kept).

The model is one block (block_schedule.blocks has one entry; its `layers` is the depth): MoD routes inside the
block's layers and never exits early. The `mod` node (`lego.methods.mod.MoDConfig`) sets the routing. `stage_0/`
holds model.safetensors, stats.json (written last: a re-run loads the stage) and, while training, checkpoint.pt, as
LEGO's and Universal's stages do. `test_routing` adds results.json's `mod` section after the final evaluation.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from lego.errors import ConfigError
from lego.methods.mod import MoDTraining, calibrate_thresholds, mod_layers, routing, to_mod
from lego.model import LEGOTransformer
from lego.pipeline.config import RunConfig, mod_config
from lego.pipeline.files import load_weights, read_json, save_weights, write_json
from lego.pipeline.tracking import Tracker
from lego.pipeline.universal import train_one_stage
from lego.training.routing import evaluate_routed
from lego.training.throughput import throughput
from lego.training_data import TrainingData

TRAINING_ROUTING = "top-k of each sequence's router scores (not causal)"
TEST_ROUTING = {  # by mod.causal_threshold
    "bce": "causal: a token is routed where sigmoid(router score) >= 0.5, the router's BCE-trained prediction",
    "capacity": "causal: a token is routed where its router score >= the layer's threshold, set on the validation "
    "split to route the capacity",
}


def train_from_run(
    run: RunConfig, model: LEGOTransformer, train: TrainingData, val: TrainingData, run_dir: Path, tracker: Tracker
) -> list[dict]:
    """Give `model` its routers (in place), train it, and return its one block's stats."""
    if len(model.blocks) != 1:
        raise ConfigError(
            f"method=mod trains one block, but block_schedule.blocks has {len(model.blocks)}: give one entry whose "
            "layers is the depth, e.g. block_schedule.blocks=[{layers:4}] (as +experiment=mod_small does)"
        )
    config = mod_config(run.mod)
    to_mod(model, config)
    stage_dir = run_dir / "stage_0"
    if (stage_dir / "stats.json").is_file():
        load_weights(model, stage_dir / "model.safetensors")
        print(f"mod: training complete in {stage_dir}, loaded (delete the folder to retrain)")
        return read_json(stage_dir / "stats.json", {"blocks": list})["blocks"]

    def make(_: int) -> MoDTraining:
        return MoDTraining(model, config, train, val, run.trainer.eval_batch_size, run.trainer.precision)

    method, result = train_one_stage("mod", run, make, train, stage_dir, tracker)
    if config.causal_threshold == "capacity":  # validation routed at the BCE threshold until here
        calibrate_thresholds(model, method.val_windows, config.capacity, run.trainer.eval_batch_size,
                             run.trainer.precision)  # fmt: skip
    speed = throughput(result.train_tokens, sum(result.train_flops), result.seconds, method.device)
    stats = {
        "block": 0, "layers": model.blocks[0].num_layers, "hard_ratio": None, "hard_count": None,
        "train_tokens": result.train_tokens, "train_flops": result.train_flops[0],
        "best_val_ppl": result.evals[result.best_eval]["val_ppl"] if result.evals else float("nan"),
        "seconds": result.seconds, "train_seconds": result.seconds, **speed, "evals": result.evals,
    }  # fmt: skip
    save_weights(model, stage_dir / "model.safetensors")
    write_json(stage_dir / "stats.json", {"method": "mod", "mod": asdict(config), "blocks": [stats], "moe": result.moe})
    (stage_dir / "checkpoint.pt").unlink(missing_ok=True)
    tracker.log_stage_end(0, stats)
    print(
        f"mod: {result.steps} steps, {result.train_tokens:,} tokens, best val PPL {stats['best_val_ppl']:.2f} "
        f"(causal routing), {result.seconds:.0f}s"
    )
    return [stats]


def test_routing(run: RunConfig, model: LEGOTransformer, test_windows: Tensor, device: torch.device) -> dict:
    """results.json's `mod`: how the test PPL was scored (`test_ppl_routing`: causal), each routed layer's threshold
    and the share of the test tokens it computed under it, and, for reference only, the test PPL and cost of the
    training's top-k routing (which reads later tokens: not a result a causal LM can have)."""
    batch, precision, config = run.trainer.eval_batch_size, run.trainer.precision, mod_config(run.mod)
    causal = evaluate_routed(model, test_windows, batch, device, precision)
    n = causal["tokens"]
    layers = mod_layers(model)
    shares = {name: layer.routed_in_last(n) / n for name, layer in layers.items()}
    with routing(model, topk=True):
        topk = evaluate_routed(model, test_windows, batch, device, precision)
    return {
        "mod": {
            **asdict(config), "training_routing": TRAINING_ROUTING,
            "test_ppl_routing": TEST_ROUTING[config.causal_threshold],
            "thresholds": {name: float(layer.threshold_) for name, layer in layers.items()},
            "test_routed_share": shares, "test_ppl_topk": topk["ppl"], "honest_cost_topk": topk["honest_cost"],
        }
    }  # fmt: skip
