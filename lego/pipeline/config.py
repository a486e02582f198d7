"""Structured configs behind `conf/`: types come from these dataclasses, ranges from `validate`.

Hydra merges the YAML groups into `RunConfig` (registered as `base_config`), so a wrong type
(`model.dim=abc`) fails while composing; `validate` then rejects out-of-range values
(`hard_ratio.value=1.5`, zero layers, heads not dividing dim) with a one-line `ConfigError` before any
work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from lego.common.runmeta import is_result_neutral
from lego.data import DataConfig, TokenizerConfig
from lego.errors import ConfigError, check_count, check_number, check_one_of
from lego.fitting import DUMP_DTYPES, FitConfig, StageTraining, check_hard_ratio
from lego.methods.mod import MoDConfig
from lego.model import LEGOConfig
from lego.moe import MoEConfig
from lego.pipeline.config_help import format_config_groups
from lego.pipeline.evaluation import CALIBRATIONS, LTT_RISKS
from lego.training.loop import check_loop_settings
from lego.training.precision import DEFAULT_PRECISION, PRECISIONS

METHODS = ("lego", "universal", "mod")
WANDB_MODES = ("offline", "online", "disabled")
OBJECTIVES = ("val_ppl", "val_ppl_at_cost")


def structured_config(schema: type, name: str, doc: str, only: tuple[str, ...] | None = None, **defaults: Any) -> type:
    """A Hydra structured config with the fields of the model's dataclass `schema` (one schema per concept): the
    same names, types and defaults (but `defaults`: a value, or a structured config class for a nested node), only
    the fields in `only` where given, Literal types as str (OmegaConf types no Literal). `schema`'s own checks run
    when the pipeline builds it from this node."""
    hints = typing.get_type_hints(schema)
    made = []
    for spec in fields(schema):
        if only is not None and spec.name not in only:
            continue
        hint = str if typing.get_origin(hints[spec.name]) is typing.Literal else hints[spec.name]
        default = defaults.get(spec.name, spec.default)
        if isinstance(default, type):  # a nested structured config
            made.append((spec.name, default, field(default_factory=default)))
        else:
            made.append((spec.name, hint, field(default=default)))
    return make_dataclass(name, made, namespace={"__doc__": doc, "__module__": __name__})


MoEConf = structured_config(
    MoEConfig, "MoEConf",
    """`model.moe` (the `moe` config group): `lego.moe.MoEConfig`'s fields (its docstring says what each does),
    but `num_experts: 0` by default, which keeps the dense SwiGLUs; `moe=e8_top2_aux` or `model.moe.num_experts=8`
    turns the experts on.""",
    num_experts=0,
)  # fmt: skip


ModelConf = structured_config(
    LEGOConfig, "ModelConf",
    """`model`: `lego.model.LEGOConfig`'s fields that a config group sets (the vocabulary comes from the tokenizer,
    the blocks' depths from `block_schedule`, the longest sequence from `data.seq_len`).""",
    only=("dim", "num_heads", "hidden_dim", "rope_base", "tie_embeddings", "moe"), moe=MoEConf,
)  # fmt: skip


ModConf = structured_config(
    MoDConfig, "ModConf", "`mod` (read by `method=mod`): `lego.methods.mod.MoDConfig`'s fields, see docs/mod.md."
)


@dataclass
class StageConf(StageTraining):
    """One block of the schedule: its depth, its batch size and how its stage trains (`lego.fitting.StageTraining`:
    the fields and defaults `FitConfig` has too, defined there once)."""

    layers: int = 2
    batch_size: int | None = None  # None: data.batch_size


@dataclass
class BlockScheduleConf:
    blocks: list[StageConf] = field(default_factory=lambda: [StageConf(), StageConf()])


@dataclass
class HardRatioConf:
    """Share of the tokens reaching a block that become the next block's hard tokens."""

    value: float = 0.5
    per_block: list[float] | None = None  # one ratio per block but the last; overrides `value`


DUMP_MODES = ("auto", "keep", "delete", "none", "stream")  # trainer.dump


@dataclass
class TrainerConf:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 64
    grad_clip: float = 1.0
    # A stage stops as diverged when a step's LM loss is NaN/inf or over this times its first step's (null: NaN/inf)
    divergence_factor: float | None = 3.0
    # Read a step's losses to the host (W&B, the progress bar, the divergence check) every this many steps
    log_every_steps: int = FitConfig.log_every_steps
    # A stage checkpoint every this many steps, besides those at its validations (null: at validations only)
    checkpoint_every_steps: int | None = FitConfig.checkpoint_every_steps
    threshold_scan: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    precision: str = DEFAULT_PRECISION  # auto (bf16 autocast on CUDA where supported, else float32) | float32 | bf16
    compile: bool = False  # torch.compile every layer of the model (LEGOBlock.compile_layers), for CUDA
    # A stage's TrainingData (hard tokens, routed validation set) up to this many MB per rank is held in
    # memory; a larger one is streamed from disk (memory-mapped). 0: always stream; null: never.
    memory_budget_mb: float | None = 1024.0
    fsdp: bool = False  # under torchrun: FSDP2-shard the trained block's layers (params, grads, AdamW state)
    progress: bool = True
    # Each stage's hard-token dump (stage_<k>/hard_tokens.safetensors, the next stage's inputs): keep it; delete
    # it once the next stage is complete; or none: never write it (the next stage's inputs stay in memory and a
    # resume recomputes them from the token ids by running the frozen blocks); or stream: write only the hard tokens'
    # mask (stage_<k>/hard_mask.npy, 1 byte per token) and make the next stage's inputs for every batch by running
    # the frozen blocks on the token ids. auto: keep, but delete in a multirun (lego.pipeline.staged._dump_mode).
    dump: str = "auto"
    dump_dtype: str = "bfloat16"  # the dump's hidden states: bfloat16 (half the bytes, docs/benchmarks.md) | float32
    # The final evaluation's exit thresholds (docs/calibration.md): ratio (the method's own: LEGO's by hard ratio,
    # Universal's configured one) | ltt (Learn-then-Test on the validation split: the `ltt_risk` is <= ltt_epsilon
    # with probability >= 1 - ltt_delta)
    calibration: str = "ratio"
    ltt_epsilon: float = 0.05
    ltt_delta: float = 0.1
    ltt_risk: str = "disagreement"  # disagreement (with the full-depth argmax) | ppl (relative PPL increase)


@dataclass
class WandbConf:
    mode: str = "offline"  # offline (default, inside the run dir) | online | disabled
    project: str = "lego"
    entity: str | None = None
    group: str | None = None  # None: the sweep's folder name in multirun, no group otherwise
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ObjectiveConf:
    """What `train.py` returns to a Hydra sweeper (Optuna, Ax, ...): a validation number, never a test one, so
    that tuning never sees the test set. Lower is better."""

    metric: str = "val_ppl"  # val_ppl (calibrated early exit) | val_ppl_at_cost (best over the exit shares below)
    max_honest_cost: float = 0.8  # val_ppl_at_cost: the lowest val PPL of the threshold scan at this honest cost


@dataclass
class RunConfig:
    model: ModelConf = field(default_factory=ModelConf)
    block_schedule: BlockScheduleConf = field(default_factory=BlockScheduleConf)
    hard_ratio: HardRatioConf = field(default_factory=HardRatioConf)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    wandb: WandbConf = field(default_factory=WandbConf)
    objective: ObjectiveConf = field(default_factory=ObjectiveConf)
    method: str = "lego"  # lego (staged, block by block) | universal (joint, lego.methods.universal) | mod
    universal: dict[str, Any] = field(default_factory=dict)  # method=universal: checked by its own schema
    mod: ModConf = field(default_factory=ModConf)  # method=mod: Mixture-of-Depths (lego.methods.mod)
    experiment_name: str = "default"
    seed: int = 0
    cache_dir: str = "~/.cache/lego"
    debug: bool = False  # print tracebacks for user errors too


JOB_DIRNAME_CHARS = 64  # longest override part of a sweep job's folder name


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)  # conf/config.yaml hydra.sweep.subdir
    # conf/config.yaml hydra.job.config.override_dirname.exclude_keys
    OmegaConf.register_new_resolver("job_dirname_exclude_keys", job_dirname_exclude_keys, replace=True)
    OmegaConf.register_new_resolver("config_groups", format_config_groups, replace=True)  # conf/hydra/help/lego.yaml


def job_dirname(num: int, overrides: str) -> str:
    """A sweep job's folder name: `<num>_<overrides>`, one level, short and safe on any filesystem.

    Hydra's `override_dirname` keeps every character of the overrides, so a path (`data.files=[/data/a.txt]`) would
    nest the job's folder under its directories. Runs of characters other than letters, digits and `._=,+-` become
    one `_`; a name longer than JOB_DIRNAME_CHARS keeps its start (the first key) and its end (a path's file name)
    around a hash of the whole, so jobs stay apart.
    """
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(overrides)).strip("_")
    if len(safe) > JOB_DIRNAME_CHARS:
        digest = hashlib.sha1(str(overrides).encode()).hexdigest()[:8]
        head = JOB_DIRNAME_CHARS // 3
        tail = safe[-(JOB_DIRNAME_CHARS - head - len(digest) - 2) :]
        safe = f"{safe[:head].rstrip('_')}_{digest}_{tail.lstrip('_')}"
    return f"{num}_{safe}" if safe else str(num)


def job_dirname_exclude_keys() -> list[str]:
    """The overrides a sweep job's folder name leaves out: the experiment (the sweep folder names it) and the
    result-neutral keys (`lego.common.runmeta`), as `run_label` does. Hydra matches these keys exactly, so each
    result-neutral section comes with every key under it (`wandb`, `wandb.mode`, ...)."""
    return ["experiment", *(key for key in _schema_keys(RunConfig, "") if is_result_neutral(key))]


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed, validated config."""
    check_known_keys(cfg)
    run = OmegaConf.to_object(cfg)
    if not isinstance(run, RunConfig):
        raise ConfigError("the config does not derive from base_config; keep `base_config` first in conf/config.yaml")
    validate(run)
    return run


def check_known_keys(cfg: DictConfig) -> None:
    """A ConfigError naming every key no schema knows (`+model.dimm=3`), with the nearest known key.

    Hydra's `+key=value` adds a key even to a typed node, and `OmegaConf.to_object` then drops it silently, so a
    typo would train with the default. One node is free-form here: `universal` (a `dict[str, Any]`, read only by
    `method=universal`, whose own schema, `lego.methods.universal_config.from_dict`, rejects unknown keys when
    training starts); with any other method it must stay empty.
    """
    known: list[str] = []
    unknown: list[tuple[str, list[str]]] = []  # (key, its siblings' keys)
    _collect_keys(cfg, "", known, unknown)
    errors = [_unknown_key_message(key, siblings, known) for key, siblings in unknown]
    if cfg.get("method") != "universal" and cfg.get("universal"):
        errors.append(f"universal.{next(iter(cfg.universal))} is read only by method=universal; drop it or set that")
    if errors:
        raise ConfigError("; ".join(errors))


def _collect_keys(node: Any, prefix: str, known: list[str], unknown: list[tuple[str, list[str]]]) -> None:
    """Sort the keys under a typed node into `known` (its dataclass's fields) and `unknown`, recursively."""
    if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing():
        return  # a value, null or ???
    if node._is_interpolation():
        return  # checked where it points to
    if isinstance(node, ListConfig):
        for index in range(len(node)):
            _collect_keys(node._get_node(index), f"{prefix.rstrip('.')}[{index}].", known, unknown)
        return
    schema = OmegaConf.get_type(node)
    if schema is None or not is_dataclass(schema):
        return  # a free-form dict
    names = [f.name for f in fields(schema)]
    for key, value in node.items_ex(resolve=False):
        if key in names:
            known.append(f"{prefix}{key}")
            _collect_keys(value, f"{prefix}{key}.", known, unknown)
        else:
            unknown.append((f"{prefix}{key}", [f"{prefix}{name}" for name in names]))


def _unknown_key_message(key: str, siblings: list[str], known: list[str]) -> str:
    """`unknown config key model.dimm (did you mean model.dim?)`: a close sibling first, else a close key elsewhere."""
    leaf = _leaf(key)
    near = _closest(leaf, siblings, cutoff=0.6) or _closest(leaf, known, cutoff=0.8)
    hint = f"did you mean {near}?" if near else "no such key; `python train.py --cfg job` prints every key"
    return f"unknown config key {key} ({hint})"


_HYDRA_FLAGS_WITH_VALUE = {
    "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p", "--package",
    "--experimental-rerun",
}  # fmt: skip


def exit_on_unknown_override_keys(args: list[str], conf_dir: Path) -> None:
    """Exit 2 with one line when a plain command-line override (`model.dimm=3`) names a key no schema knows, or
    a config group override (`hard_ratio=0.3`, `+experiment=smal`) gives none of the group's options
    (`lego.pipeline.group_overrides`).

    Hydra would refuse them too, but later, in several lines whose advice (`+model.dimm=3`) adds the typo. Runs
    before Hydra: `+key` / `++key` ones are checked after composing (`check_known_keys`), `hydra.*` keys and
    Hydra's own groups (`hydra/sweeper=optuna`) are Hydra's, and a syntax error is left to Hydra's parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from lego.pipeline.group_overrides import group_choice_error

    if "-sc" in args or "--shell-completion" in args:
        return  # `-sc install=bash`: the arguments are Hydra's completion command, not overrides
    flag_of_value = {i + 1: arg for i, arg in enumerate(args[:-1]) if arg in _HYDRA_FLAGS_WITH_VALUE}  # -cn other
    # config groups may also live in an added config dir (`-cd DIR`, `--config-dir=DIR`)
    group_dirs = [conf_dir, *(Path(args[i]) for i, flag in flag_of_value.items() if flag in ("-cd", "--config-dir"))]
    group_dirs += [Path(arg.split("=", 1)[1]) for arg in args if arg.startswith("--config-dir=")]
    plain = [
        arg for i, arg in enumerate(args)
        if "=" in arg and not arg.startswith(("-", "~")) and i not in flag_of_value
    ]  # fmt: skip
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except HydraException:
        return
    known = _schema_keys(RunConfig, "")
    errors = []
    for override, text in zip(overrides, plain, strict=True):
        key = override.key_or_group
        if override.package is not None or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if any((directory / key).is_dir() for directory in group_dirs):
            errors.append(group_choice_error(override, text, group_dirs))
            continue
        if override.is_add() or override.is_force_add():
            continue  # checked after composing
        path, siblings = _schema_path(RunConfig, key.split("."))
        if path is None:
            errors.append(_unknown_key_message(_display(key), siblings, known))
    errors = [error for error in errors if error]
    if errors:
        print(f"error: {'; '.join(errors)}", file=sys.stderr)
        sys.exit(2)


def _schema_path(schema: Any, parts: list[str], prefix: str = "") -> tuple[str | None, list[str]]:
    """(the key as shown, []) when the dataclass tree under `schema` has the dotted `parts`; else (None, the
    keys beside the first missing part). A list of dataclasses takes an index; a dict or Any node takes any key."""
    schema = _without_none(schema)
    if not parts:
        return prefix, []
    head, rest = parts[0], parts[1:]
    if is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        if head not in hints:
            return None, [f"{prefix}{name}" for name in hints]
        return _schema_path(hints[head], rest, f"{prefix}{head}.")
    if typing.get_origin(schema) is list and head.isdigit():
        return _schema_path(typing.get_args(schema)[0], rest, f"{prefix.rstrip('.')}[{head}].")
    if schema is Any or typing.get_origin(schema) is dict:
        return f"{prefix}{'.'.join(parts)}", []  # free-form
    return None, []  # a value has no keys under it


def _schema_keys(schema: Any, prefix: str) -> list[str]:
    """Every key of the dataclass tree under `schema` (list elements as `[0]`), for the nearest-key hint."""
    schema = _without_none(schema)
    if typing.get_origin(schema) is list:
        return _schema_keys(typing.get_args(schema)[0], f"{prefix.rstrip('.')}[0].")
    if not is_dataclass(schema):
        return []
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        keys += [f"{prefix}{name}", *_schema_keys(hint, f"{prefix}{name}.")]
    return keys


def _without_none(hint: Any) -> Any:
    """`X | None` as X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else hint
    return hint


def _display(key: str) -> str:
    """`block_schedule.blocks.0.lrr` as the config shows it: `block_schedule.blocks[0].lrr`."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _closest(leaf: str, keys: list[str], cutoff: float) -> str | None:
    """The first of `keys` whose last part is nearest to `leaf` (difflib), None when none is close enough."""
    by_leaf: dict[str, str] = {}
    for key in keys:
        by_leaf.setdefault(_leaf(key), key)
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=cutoff)
    return by_leaf[match[0]] if match else None


def validate(run: RunConfig) -> None:
    check_one_of("method", run.method, METHODS)
    check_one_of("wandb.mode", run.wandb.mode, WANDB_MODES)
    check_one_of("objective.metric", run.objective.metric, OBJECTIVES)
    check_number("objective.max_honest_cost", run.objective.max_honest_cost, low=0, low_open=True, hint="e.g. 0.8")
    m = run.model
    if m.dim < 1 or m.num_heads < 1 or m.dim % m.num_heads or (m.dim // m.num_heads) % 2:
        raise ConfigError(
            f"model.dim={m.dim} must split into model.num_heads={m.num_heads} heads of even size; "
            "change one of them (e.g. dim 256 with 4 or 8 heads)"
        )
    if m.hidden_dim is not None and m.hidden_dim < 1:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be positive or null")
    check_number("model.rope_base", m.rope_base, low=1, low_open=True, hint="e.g. 10000")
    moe_config(m.moe)
    blocks = run.block_schedule.blocks
    if not blocks:
        raise ConfigError("block_schedule.blocks is empty: give at least one block")
    for k, stage in enumerate(blocks):
        _validate_stage(f"block_schedule.blocks[{k}]", stage)
    ratios = hard_ratios(run)
    for k, ratio in enumerate(ratios):
        key = "hard_ratio.value" if run.hard_ratio.per_block is None else f"hard_ratio.per_block[{k}]"
        check_hard_ratio(ratio, key)
    _validate_trainer(run.trainer)
    mod_config(run.mod)
    run.data.validate()
    run.tokenizer.validate()


def _validate_stage(key: str, stage: StageConf) -> None:
    """A stage's own keys here; its training settings' ranges are `StageTraining.check`'s, the one check of them."""
    check_count(f"{key}.layers", stage.layers)
    check_count(f"{key}.batch_size", stage.batch_size, null="data.batch_size")
    stage.check(f"{key}.")


def _validate_trainer(trainer: TrainerConf) -> None:
    check_loop_settings(trainer, "trainer.")  # the loop's own check of these (LoopConfig)
    if not trainer.threshold_scan:
        raise ConfigError("trainer.threshold_scan is empty: give the exit shares to scan, e.g. [0.0,0.5,0.9]")
    for share in trainer.threshold_scan:
        check_number("trainer.threshold_scan", share, low=0, high=1, high_open=True, hint="exit shares")
    if trainer.eval_batch_size < 1:
        raise ConfigError(f"trainer.eval_batch_size={trainer.eval_batch_size} must be positive")
    if trainer.num_threads is not None and trainer.num_threads < 1:
        raise ConfigError(f"trainer.num_threads={trainer.num_threads} must be positive, or null for torch's default")
    check_one_of("trainer.dump", trainer.dump, DUMP_MODES)
    check_one_of("trainer.precision", trainer.precision, PRECISIONS)
    check_one_of("trainer.dump_dtype", trainer.dump_dtype, tuple(DUMP_DTYPES))
    check_one_of("trainer.calibration", trainer.calibration, CALIBRATIONS)
    check_one_of("trainer.ltt_risk", trainer.ltt_risk, LTT_RISKS)
    for key in ("ltt_epsilon", "ltt_delta"):
        check_number(f"trainer.{key}", getattr(trainer, key), low=0, high=1, low_open=True, high_open=True,
                     hint="e.g. 0.05 (epsilon), 0.1 (delta)")  # fmt: skip
    if trainer.memory_budget_mb is not None:
        check_number("trainer.memory_budget_mb", trainer.memory_budget_mb, low=0,
                     hint="MB >= 0 (0: always stream) or null (always in memory)")  # fmt: skip
    if not (trainer.device in ("auto", "cpu", "cuda") or trainer.device.startswith("cuda:")):
        raise ConfigError(f"trainer.device={trainer.device!r} is unknown; use auto, cpu, cuda or cuda:N")


def hard_ratios(run: RunConfig) -> list[float]:
    """One ratio per block but the last (the last block keeps every token that reaches it)."""
    n = len(run.block_schedule.blocks) - 1
    per_block = run.hard_ratio.per_block
    if per_block is None:
        return [run.hard_ratio.value] * n
    if len(per_block) != n:
        raise ConfigError(
            f"hard_ratio.per_block has {len(per_block)} values for {n + 1} blocks; give one per block but the last"
        )
    return list(per_block)


def model_config(run: RunConfig, vocab_size: int) -> LEGOConfig:
    return LEGOConfig(
        vocab_size=vocab_size,
        dim=run.model.dim,
        num_heads=run.model.num_heads,
        layers_per_block=[stage.layers for stage in run.block_schedule.blocks],
        max_seq_len=run.data.seq_len,
        hidden_dim=run.model.hidden_dim,
        rope_base=run.model.rope_base,
        tie_embeddings=run.model.tie_embeddings,
        moe=moe_config(run.model.moe),
    )


def moe_config(conf: MoEConf) -> MoEConfig | None:
    """`model.moe` as the model's `MoEConfig` (None for dense, `num_experts: 0`); its range checks become one-line
    ConfigErrors naming the key."""
    if conf.num_experts == 0:
        return None
    try:
        return MoEConfig(**{f.name: getattr(conf, f.name) for f in fields(MoEConfig)})
    except ValueError as err:
        raise ConfigError(f"model.moe: {err}") from None


def mod_config(conf: ModConf) -> MoDConfig:
    """`mod` as `lego.methods.mod.MoDConfig`, whose checks are one-line ConfigErrors naming the key."""
    return MoDConfig(**{f.name: getattr(conf, f.name) for f in fields(MoDConfig)})


def fit_config(
    run: RunConfig, k: int, hard_ratio: float | None, checkpoint_path: str | None, active_share: float = 1.0
) -> FitConfig:
    """Block k's training settings. Unless the stage sets its own batch_size, a batch holds enough
    sequences for about `data.batch_size * seq_len` active tokens: later blocks, whose sequences are
    only partly hard, take the same number of trainable tokens per step as Block 0."""
    stage = run.block_schedule.blocks[k]
    batch_size = stage.batch_size or max(1, round(run.data.batch_size / max(active_share, 1e-6)))
    # the stage's own training settings (StageTraining, which FitConfig extends), the rest set here
    shared = {f.name: getattr(stage, f.name) for f in fields(StageTraining)}
    return FitConfig(
        **shared,
        batch_size=batch_size,
        eval_batch_size=run.trainer.eval_batch_size,
        grad_clip=run.trainer.grad_clip,
        hard_ratio=hard_ratio,
        seed=run.seed + k,
        checkpoint_path=checkpoint_path,
        divergence_factor=run.trainer.divergence_factor,
        log_every_steps=run.trainer.log_every_steps,
        checkpoint_every_steps=run.trainer.checkpoint_every_steps,
        precision=run.trainer.precision,
        memory_budget_mb=run.trainer.memory_budget_mb,
        fsdp=run.trainer.fsdp,
    )
