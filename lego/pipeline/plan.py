"""What a run will need, said before any training (issue "a billion tokens on one machine", item 5): per stage its
training tokens and FLOPs, and for the chosen `trainer.dump` the disk and the memory of the hand-off between stages;
a run whose hand-off cannot fit the free disk is refused with one line before it starts (one that cannot fit
`trainer.memory_budget_mb` is refused by `lego.pipeline.staged`, which also checks what a resume recomputes).

The arithmetic (`handoff_need`, `stage_flops`) takes plain numbers, so docs/scaling.md's projections to 10^9 and
10^10 tokens (`experiments/bench_scale.py --project`) come from the same code as a run's own plan.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from lego.errors import ConfigError
from lego.fitting import DUMP_DTYPES
from lego.training.loop import Schedule, planned_steps
from lego.training_data import dump_bytes

# Bytes per training token that each hand-off mode writes (disk) or holds (memory) per stage boundary.
MASK_FILE_BYTES = 9  # trainer.dump=none: int32 token id + int32 target + bool mask (hard_mask.safetensors)
STREAM_BYTES = 1  # trainer.dump=stream: the hard mask, one byte per token
STREAM_SPILL_BYTES = 4  # ... and, while a stage selects its hard tokens, its float32 confidences


@dataclass
class HandoffNeed:
    """The hand-off's cost over a whole run: the most disk it holds at once and its peak memory (bytes)."""

    disk: float
    memory: float


def handoff_need(
    tokens: int, dim: int, ratios: list[float], dump: str, dump_dtype: str = "bfloat16", budget_mb: float | None = None
) -> HandoffNeed:
    """Disk and memory of the hand-off of a run over `tokens` training tokens with these hard ratios (one per stage
    boundary). Every boundary's file covers every training token (the hard ones are a mask over them):
    - keep: every stage's hidden-state dump stays (`dump_bytes`: `itemsize * dim + 5` bytes per token each);
    - delete: a dump is removed once the next stage is complete, so at most two exist at once;
    - none: a small mask file per boundary on disk, the next stage's float32 states in memory;
    - stream: a one-byte mask per boundary, plus one float32 confidence per token while selecting.
    A dump above `budget_mb` is memory-mapped (its memory is then bounded by the batches), else read in."""
    boundaries = len(ratios)
    if boundaries == 0:
        return HandoffNeed(0.0, 0.0)
    if dump in ("keep", "delete", "auto"):
        each = dump_bytes(tokens, 1, dim, DUMP_DTYPES[dump_dtype].itemsize)
        held = boundaries if dump == "keep" else min(boundaries, 2)
        in_memory = budget_mb is None or each <= budget_mb * 2**20
        return HandoffNeed(each * held, each if in_memory else 0.0)
    if dump == "none":
        return HandoffNeed(tokens * MASK_FILE_BYTES * boundaries, dump_bytes(tokens, 1, dim))  # float32 in memory
    if dump == "stream":
        return HandoffNeed(tokens * (STREAM_BYTES * boundaries + STREAM_SPILL_BYTES), 0.0)
    raise ConfigError(f"trainer.dump={dump!r} is unknown; use one of: auto, keep, delete, none, stream")


def stage_tokens(tokens: int, ratios: list[float]) -> list[int]:
    """Active training tokens of each stage: all of them for Block 0, then the previous stage's hard share."""
    counts = [tokens]
    for ratio in ratios:
        counts.append(int(counts[-1] * ratio))
    return counts


def format_bytes(nbytes: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes / 2**10:.0f} kB"


@dataclass
class RunPlan:
    """A run's plan: per stage its active tokens and training FLOPs (its passes over its data; with
    `trainer.dump=stream` the frozen earlier blocks' forward too), and the hand-off's need."""

    dump: str
    stage_tokens: list[int]
    stage_flops: list[float]
    need: HandoffNeed
    free_disk: float

    def lines(self) -> list[str]:
        stages = ", ".join(
            f"Block {k} {tokens:,} tokens {flops:.2e} FLOPs"
            for k, (tokens, flops) in enumerate(zip(self.stage_tokens, self.stage_flops, strict=True))
        )
        return [
            f"plan: {stages} (training, at most)",
            f"plan: hand-off trainer.dump={self.dump}: {format_bytes(self.need.disk)} of disk at most "
            f"({format_bytes(self.free_disk)} free), {format_bytes(self.need.memory)} of memory",
        ]


def plan_run(model, train_tokens: int, seq_len: int, ratios: list[float], epochs: list[float], trainer, run_dir: Path):
    """The plan of a LEGO run (model: a LEGOTransformer; `epochs`: each stage's planned passes over its data, a
    fraction when `max_steps` stops it earlier; `trainer.dump` resolved, not `auto`); refused (ConfigError) when the
    hand-off cannot fit the free disk under `run_dir`."""
    tokens = stage_tokens(train_tokens, ratios)
    flops = [
        3 * passes * block.forward_flops(n, train_tokens, seq_len, n)  # K/V of at most every token
        for block, n, passes in zip(model.blocks, tokens, epochs, strict=True)
    ]
    if trainer.dump == "stream":  # each stage also runs the frozen blocks before it on every batch, forward only
        prefix = [block.forward_flops(n, train_tokens, seq_len) for block, n in zip(model.blocks, tokens, strict=False)]
        flops = [f + passes * sum(prefix[:k]) for k, (f, passes) in enumerate(zip(flops, epochs, strict=True))]
    need = handoff_need(train_tokens, model.dim, ratios, trainer.dump, trainer.dump_dtype, trainer.memory_budget_mb)
    free = shutil.disk_usage(_existing(run_dir)).free
    plan = RunPlan(trainer.dump, tokens, flops, need, free)
    if need.disk > free:
        raise ConfigError(
            f"trainer.dump={trainer.dump} needs {format_bytes(need.disk)} of disk for the hand-off but "
            f"{format_bytes(free)} are free under {run_dir}; use trainer.dump=stream (1 byte per token) or free space"
        )
    return plan


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def planned_passes(sequences: int, batch_size: int, epochs: int, max_steps: int | None) -> float:
    """A stage's passes over its data: `epochs`, fewer when `max_steps` ends it first (the loop's `planned_steps`)."""
    per_epoch = max(1, math.ceil(sequences / batch_size))
    return planned_steps(per_epoch, Schedule(epochs=epochs, max_steps=max_steps)) / per_epoch
