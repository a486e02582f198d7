"""One experiment, end to end: data -> model -> training (staged LEGO or joint Universal) -> evaluation
through TRUE early exit -> results.json, plots, W&B, a one-screen summary.

`run_experiment` needs no Hydra (tests and notebooks call it with a RunConfig); `main` is the Hydra
entry that `train.py` wraps: it resolves the run directory and the W&B group, and turns user errors
into one clear line and a non-zero exit.

Under torchrun (`torchrun --nproc_per_node=N train.py ...`) every rank runs `main`: they agree on rank
0's run directory, train on their shards of the data (`TrainingData.shard`), and rank 0 alone evaluates,
writes results and plots, logs to W&B and prints (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from lego import distributed
from lego.atomic import remove_stale_temporaries
from lego.common.runmeta import RESUME_VOLATILE_KEYS, parse_overrides, run_label
from lego.data import format_summary, prepare_data
from lego.errors import ConfigError, LEGOError, TrainingDiverged
from lego.model import LEGOTransformer
from lego.moe import RoutingTally
from lego.pipeline.checks import warn_small_splits
from lego.pipeline.config import RunConfig, model_config, to_run_config
from lego.pipeline.evaluation import (
    ltt_calibrate,
    measure_speedup,
    scan_passes,
    threshold_scan,
    timing_passes,
)
from lego.pipeline.files import read_json, write_json
from lego.pipeline.methods import get_method, method_results
from lego.pipeline.plots import make_run_plots
from lego.pipeline.run_dir import RunLock, claim, keep_hydra_record, remove_own_files, restore_hydra_record
from lego.pipeline.staged import dense_compute_reference
from lego.pipeline.summary import format_results
from lego.pipeline.tracking import Tracker
from lego.training.precision import autocast_dtype, enable_tf32
from lego.training.routing import evaluate_routed
from lego.training.throughput import pooled
from lego.training_data import TrainingData


def run_experiment(
    run: RunConfig, resolved: dict, run_dir: Path, group: str | None = None, overrides: dict[str, str] | None = None
) -> dict:
    """Train and evaluate one run in `run_dir`; returns results.json's content ({} on ranks other than 0).

    `group` is the W&B group of a sweep's jobs; `overrides` (key -> value as typed) name the W&B run and sit in
    its config as flat keys, so W&B can group and plot by what a sweep varied."""
    started = time.perf_counter()
    rank, world = distributed.world()
    if world > 1 and run.method != "lego":
        raise ConfigError(f"method={run.method} runs in one process only; start it without torchrun")
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run_dir, resolved)
    if run.trainer.num_threads:
        torch.set_num_threads(run.trainer.num_threads)
    device = pick_device(run.trainer.device)
    compute_dtype = autocast_dtype(device, run.trainer.precision)  # bf16 on a device without it: refused here
    enable_tf32(device)

    if rank > 0:
        distributed.barrier()  # rank 0 fills the data cache first, the others then read it
    prepared = prepare_data(run.data, run.tokenizer, cache_dir=run.cache_dir, progress=run.trainer.progress)
    if rank == 0:
        distributed.barrier()
    unigram_ppl = prepared.unigram_ppl()
    print(format_summary(prepared.summary))
    print(f"baseline: unigram test PPL {unigram_ppl:.1f}")
    warn_small_splits(prepared.summary, run.data)
    if rank == 0:
        write_json(run_dir / "run_config.json", _comparable(resolved))
        prepared.tokenizer.save(run_dir / "tokenizer.json")

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = build_model(run, prepared.vocab_size, device)
    train = TrainingData.from_windows(prepared.train).shard(rank, world)
    val = TrainingData.from_windows(prepared.val).shard(rank, world)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.2f}M parameters, blocks of {[b.num_layers for b in model.blocks]} layers, "
        f"dim {model.dim}, on {device} in {'bf16 autocast' if compute_dtype else 'float32'}"
        + (", layers compiled" if run.trainer.compile else "")
    )

    mode = run.wandb.mode if rank == 0 else "disabled"  # one W&B run, from rank 0
    overrides = overrides or {}
    name = run_label(run.experiment_name, overrides) if overrides else f"{run.experiment_name}/{run_dir.name}"
    tracker = Tracker(
        run_dir=run_dir, config={**resolved, "overrides": {k: _typed(v) for k, v in overrides.items()}}, mode=mode,
        project=run.wandb.project, entity=run.wandb.entity, group=run.wandb.group or group,
        name=run.wandb.name or name, tags=list(run.wandb.tags),
    )  # fmt: skip
    with tracker:
        stages = get_method(run.method)(run, model, train, val, run_dir, tracker)
        if rank > 0:
            return {}
        results = final_results(run, model, prepared.val, prepared.test, stages, device)
        check_finite_results(results)
        results.update(
            unigram_ppl=unigram_ppl,
            parameters=n_params,
            data={k: prepared.summary[k] for k in ("source", "documents", "tokens", "vocab_size", "fingerprint")},
            wall_seconds=time.perf_counter() - started,
            code=code_version(),
        )
        write_json(run_dir / "results.json", results)
        images = make_run_plots(results, run_dir / "plots")
        tracker.log_final(results, images)
    print(format_results(results, run_dir))
    return results


def build_model(run: RunConfig, vocab_size: int, device: torch.device) -> LEGOTransformer:
    """The run's model on `device`; with `trainer.compile` every block's layers compiled (`LEGOBlock.compile_layers`,
    one static shape per compile: the sparse path's padded buckets keep their number small), before any stage
    trains. torch.compile is lazy: a layer compiles at its first call."""
    model = LEGOTransformer.from_config(model_config(run, vocab_size)).to(device)
    if run.trainer.compile:
        for block in model.blocks:
            block.compile_layers(dynamic=False)
    return model


def final_results(
    run: RunConfig, model: LEGOTransformer, val_windows, test_windows, stages: list[dict], device
) -> dict:
    batch, precision = run.trainer.eval_batch_size, run.trainer.precision
    shares = sorted({0.0, *run.trainer.threshold_scan})
    print(
        f"final evaluation: test and validation through the exits and a threshold scan of {len(shares)} exit shares "
        "(each split read once), then the speed-up timing"
    )
    trainer, ltt = run.trainer, None
    if trainer.calibration == "ltt":  # Learn-then-Test's thresholds, chosen on the validation split
        ltt = ltt_calibrate(model, val_windows, test_windows, trainer.ltt_risk, trainer.ltt_epsilon, trainer.ltt_delta,
                            batch, device, precision)  # fmt: skip
    moe = model.named_moe_ffns()
    total = scan_passes(model, shares) + bool(moe) + timing_passes()  # passes over a split: the scan, MoE, timing
    with tqdm(total=total, desc="final evaluation", unit="pass", disable=not trainer.progress) as bar:
        calibrated = [block.threshold for block in model.blocks]
        scan, (test,), (val,) = threshold_scan(
            model, val_windows, test_windows, shares, batch, device, run.objective.metric == "val_ppl_at_cost",
            precision, also=[calibrated], on_pass=bar.update,
        )  # fmt: skip
        with RoutingTally(moe) as tally:  # MoE layers' routing of the test tokens reaching them, in a pass of its own
            if moe:
                evaluate_routed(model, test_windows, batch, device, precision)
                bar.update()
        bar.set_description("speed-up timing")
        # wall time of full-depth forwards over routed ones on the same test batches, alternating rounds
        speedup = measure_speedup(model, test_windows, batch, device, on_pass=bar.update, precision=precision)
    full_depth = next(row for row in scan if row["target_exit_share"] == 0.0)
    own = method_results(run.method)  # what the method adds of its own (MoD: its test routing)
    blocks = []
    for block_row, stage in zip(test["blocks"], stages, strict=True):
        blocks.append({
            **block_row,
            "hard_ratio": stage.get("hard_ratio"),
            "hard_count": stage.get("hard_count"),
            "train_tokens": stage.get("train_tokens"),
            "train_flops": stage.get("train_flops"),
            "collect_flops": stage.get("collect_flops", 0.0),
            "best_val_ppl": stage.get("best_val_ppl"),
            "seconds": stage.get("seconds"),
            "train_seconds": stage.get("train_seconds"),
            "tokens_per_second": stage.get("tokens_per_second"),
            "mfu": stage.get("mfu"),
            "evals": stage.get("evals", []),
        })  # fmt: skip
    # training compute: the training steps plus each stage's hard-token collection forward (and, streamed, the frozen
    # earlier blocks' forward that made its inputs)
    train_flops = sum(stage.get("train_flops", 0.0) + stage.get("collect_flops", 0.0) + stage.get("stream_flops", 0.0)
                      for stage in stages)  # fmt: skip
    first_stage_tokens = stages[0].get("train_tokens", 0)
    dense_reference = dense_compute_reference(model, first_stage_tokens, test_windows.shape[1] - 1)
    training = pooled(stages)  # the stages' training throughput, pooled over their seconds
    return {
        "method": run.method,
        "experiment_name": run.experiment_name,
        "test_ppl": test["ppl"],
        "test_acc": test["acc"],
        "val_ppl": val["ppl"],
        "val_acc": val["acc"],
        "test_ppl_full_depth": full_depth["test_ppl"],
        "test_acc_full_depth": full_depth["test_acc"],
        "exit_counts": test["exit_counts"],
        "exit_rates": test["exit_rates"],
        "shallow_ratio": test["shallow_ratio"],
        "compute_cost": test["compute_cost"],
        "honest_cost": test["honest_cost"],
        "thresholds": [row["threshold"] for row in test["blocks"]],
        "blocks": blocks,
        "stage_seconds": [stage.get("seconds") for stage in stages],
        "train_flops": train_flops,
        "train_flops_vs_dense": train_flops / dense_reference if dense_reference else None,
        "train_tokens_per_second": training["tokens_per_second"],
        "train_mfu": training["mfu"],
        "threshold_scan": scan,
        "test_seconds": test["seconds"],
        "inference_speedup": speedup["median"],
        "inference_speedup_iqr": [speedup["q25"], speedup["q75"]],
        "inference_speedup_rounds": speedup["rounds"],
        "inference_speedup_null_rounds": speedup["null_rounds"],  # equal-work adjacent passes: the noise floor
        "inference_speedup_noise": speedup["noise"],
        "inference_speedup_load": speedup["load"],
        "inference_speedup_caveat": speedup["caveat"],  # None when the figure counts
        "confidence_histograms": test["confidence_histograms"],
        "test_tokens": test["tokens"],
        "objective_metric": run.objective.metric,
        "objective": objective(run, val["ppl"], scan),
        "moe": tally.summary(),  # per MoE layer: expert load, imbalance, entropy, dropped share ([] when dense)
        "calibration": trainer.calibration,  # the exit thresholds: the method's own (ratio) or Learn-then-Test's
        "ltt": ltt,  # calibration=ltt: the promised risk (epsilon, delta), the exit share chosen, the risk on test
        **(own(run, model, test_windows, device) if own else {}),
    }


FINISHED_METRICS = ("test_ppl", "val_ppl", "test_ppl_full_depth", "shallow_ratio", "honest_cost", "objective")


def check_finite_results(results: dict) -> None:
    """A finished run's metrics are numbers: a NaN or infinite PPL (or an exit threshold that is not a number)
    means the model diverged, and is refused before results.json is written, so no report or sweeper reads it as
    a result. (`objective` may be inf for val_ppl_at_cost when no exit share is cheap enough: that is a result.)"""
    may_be_inf = {"objective"} if results.get("objective_metric") == "val_ppl_at_cost" else set()
    bad = [key for key in FINISHED_METRICS if not _is_number(results.get(key), allow_inf=key in may_be_inf)]
    # a threshold may be inf: that block never exits (a Universal layer without an exit)
    thresholds = results.get("thresholds", [])[:-1]
    bad += [f"thresholds[{k}]" for k, t in enumerate(thresholds) if not _is_number(t, allow_inf=True)]
    if bad:
        shown = ", ".join(f"{key} {results.get(key)!r}" if key in results else key for key in bad[:3])
        raise TrainingDiverged(
            f"the final evaluation is not finite ({shown}): the model diverged; lower the learning rate "
            "(block_schedule.blocks[k].lr) or trainer.grad_clip and train in a new hydra.run.dir"
        )


def _is_number(value: object, allow_inf: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return allow_inf or math.isfinite(value)


def code_version() -> dict | None:
    """The git commit of the LEGO checkout that ran and whether it had uncommitted changes to tracked files, so
    a result says which code made it; None when LEGO does not run from a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head, status = (
            subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def objective(run: RunConfig, val_ppl: float, scan: list[dict]) -> float:
    """The number a sweeper minimises: validation PPL with the calibrated exits, or the lowest validation PPL of
    the threshold scan within `objective.max_honest_cost` (inf when no exit share is that cheap)."""
    if run.objective.metric == "val_ppl":
        return val_ppl
    fitting = [row["val_ppl"] for row in scan if row["val_honest_cost"] <= run.objective.max_honest_cost]
    return min(fitting, default=float("inf"))


def _typed(value: str) -> object:
    """An override's value as YAML reads it (0.3 a number, so W&B can put it on an axis)."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def pick_device(name: str) -> torch.device:
    if name in ("auto", "cuda") and torch.cuda.is_available() and distributed.world()[1] > 1:
        return distributed.local_device()  # one GPU per rank
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
    return torch.device(name)


def _comparable(resolved: dict) -> dict:
    """The resolved config without the keys that may change on resume (`lego.common.runmeta`)."""
    clean = json.loads(json.dumps(resolved))
    for dotted in RESUME_VOLATILE_KEYS:
        *parents, leaf = dotted.split(".")
        node = clean
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return clean


def check_resumable(run_dir: Path, resolved: dict) -> None:
    """A run directory may only be resumed with the config it was made with. A refused command leaves Hydra's
    record of the run (`.hydra/`) as the accepted one wrote it (`lego.pipeline.run_dir`)."""
    saved_path = run_dir / "run_config.json"
    saved = _flatten(read_json(saved_path, expect={})) if saved_path.is_file() else {}
    now = _flatten(_comparable(resolved))
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key)) if saved else []
    if distributed.is_main():  # rank 0 alone writes in the shared folder
        (restore_hydra_record if changed else keep_hydra_record)(run_dir)
    if changed:
        shown = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed[:3])
        raise ConfigError(
            f"{run_dir} was made with another config ({shown}); resume with the same overrides or pick a new "
            "hydra.run.dir"
        )


def shared_run_dir(own: Path) -> Path:
    """Rank 0's Hydra output directory, on every rank.

    Hydra names the directory in each process (`${now:...}` differs between ranks started a second
    apart); a rank whose own directory differs removes it, as it holds only Hydra's bookkeeping.
    """
    shared = Path(distributed.broadcast_object(str(own)))  # absolute: Hydra makes it so
    if own != shared:
        shutil.rmtree(own / ".hydra", ignore_errors=True)
        for log in own.glob("*.log"):
            log.unlink()
        with contextlib.suppress(OSError):
            own.rmdir()
    return shared


@contextlib.contextmanager
def _stdout_on_rank_0() -> Iterator[None]:
    """Other ranks' prints go nowhere: one summary per run, not one per rank (stderr stays open)."""
    if distributed.is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main(cfg: DictConfig) -> float | None:
    """Hydra task function (see train.py). Returns the validation objective (`objective.metric`), for sweepers
    that optimise it: never a test number, so tuning cannot fit the test set (None on ranks other than 0,
    which print nothing to stdout: rank 0 reports for all).

    A user error (bad config or data, a diverged run) is one line on stderr: a single run exits 2; a sweep's job
    raises it on, so that Hydra records a failed job (the sweeper gets no objective) and goes on with the next."""
    distributed.init_from_env()
    hydra_cfg = HydraConfig.get()
    run_dir = shared_run_dir(Path(hydra_cfg.runtime.output_dir))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = f"{cfg.get('experiment_name')}/{Path(hydra_cfg.sweep.dir).name}" if multirun else None
    overrides = parse_overrides(list(hydra_cfg.overrides.task))
    try:
        with _stdout_on_rank_0(), owning(run_dir):
            run = to_run_config(cfg)
            if not distributed.is_main():
                run.trainer.progress = False
            resolved = OmegaConf.to_container(cfg, resolve=True)
            return run_experiment(run, resolved, run_dir, group, overrides).get("objective")
    except LEGOError as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        if multirun:
            raise SweepJobFailed(str(err)) from None
        sys.exit(2)


class SweepJobFailed(LEGOError, CompactHydraException):
    """A sweep job's user error, raised on to Hydra: it records the job as failed, runs the sweep's other jobs,
    then ends the sweep with the message alone (a compact Hydra error: no traceback)."""


@contextlib.contextmanager
def owning(run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run directory for the run (`lego.pipeline.run_dir`): a folder of other files is refused,
    a second process on it too, temporary files of killed writes are removed, and when bad input stops a fresh
    run, the files this process wrote are removed again (a diverged run keeps its folder, log and checkpoint)."""
    if not distributed.is_main():
        yield
        return
    claim(run_dir)
    with RunLock(run_dir):
        fresh = not (run_dir / "run_config.json").exists()
        remove_stale_temporaries(run_dir)
        try:
            yield
        except LEGOError as err:
            if fresh and not isinstance(err, TrainingDiverged) and not any(run_dir.glob("stage_*")):
                remove_own_files(run_dir)
            raise
