"""Run metadata that the pipeline and the report both read: a run's command-line overrides, its label, and the
one list of result-neutral keys.

A result-neutral key changes how a run is carried out or recorded (W&B, tracebacks, progress bars, threads, the
device, the data cache, the memory budget, FSDP sharding, what it returns to a sweeper, Hydra's own settings) but
not what it trains and measures. So a run may be resumed with another value of one
(`lego.pipeline.runner.check_resumable`), the report does not tell configs apart by one
(`lego.report.collect.Run.config_key`), and neither a run's label nor a sweep job's folder name shows one
(`run_label`, `lego.pipeline.config.job_dirname_exclude_keys`).

Two keys are handled otherwise, on purpose:
- `seed` changes what is computed: a resume refuses another seed and a label shows it, but the report averages a
  config over its seeds (a config is every override but the seed and the result-neutral ones);
- `trainer.dump` may change on resume (a resume reads whichever of a dump or a hard mask each stage left), but
  `none` hands the next stage float32 states where a dump holds `trainer.dump_dtype` ones, so it stays a config
  difference in the report and a label: `RESUME_VOLATILE_KEYS` adds it to the result-neutral keys.
"""

from __future__ import annotations

# A key matches an entry equal to it or nested under it (`wandb.mode` under `wandb`).
RESULT_NEUTRAL_KEYS = ("wandb", "debug", "trainer.progress", "trainer.num_threads", "trainer.device", "cache_dir",
                       "trainer.memory_budget_mb", "trainer.fsdp", "objective", "hydra",
                       "trainer.log_every_steps", "trainer.checkpoint_every_steps", "trainer.compile")  # fmt: skip
# What a resume may change: run_config.json leaves these out
RESUME_VOLATILE_KEYS = (*RESULT_NEUTRAL_KEYS, "trainer.dump")


def is_result_neutral(key: str) -> bool:
    """Whether the dotted `key` is one of RESULT_NEUTRAL_KEYS or lies under one."""
    return any(key == neutral or key.startswith(f"{neutral}.") for neutral in RESULT_NEUTRAL_KEYS)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Command-line overrides as {key: value as typed}; '+key' / '++key' are shown as 'key', '~key' kept."""
    overrides = {}
    for item in items:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+")] = value
    return overrides


def run_label(experiment: str, overrides: dict[str, str]) -> str:
    """'small hard_ratio.value=0.3 seed=1': the experiment and the overrides that change what is computed."""
    shown = [f"{k}={v}" for k, v in overrides.items() if not (k == "experiment" or is_result_neutral(k))]
    return " ".join([experiment, *shown])
