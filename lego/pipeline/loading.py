"""A trained run back in Python, from its run directory: `load_run("outputs/tiny/<date>_<time>")`.

The run directory holds everything needed (see README, Outputs): `run_config.json` (the resolved config, which
`model_config` maps to the architecture exactly as the runner does), `tokenizer.json`, and one
`stage_<k>/model.safetensors` per complete stage, the whole model after stage k, thresholds included (each
block's `threshold_` buffer, the one its `stats.json` records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from lego.data import PreparedData, Tokenizer, TokenizerConfig, prepare_data
from lego.errors import ConfigError, DataError
from lego.methods.mod import to_mod
from lego.model import LEGOTransformer
from lego.pipeline.config import RunConfig, mod_config, model_config, to_run_config
from lego.pipeline.files import load_weights, read_json


@dataclass
class LoadedRun:
    """A run's model after one stage, in eval mode with its calibrated thresholds, and what it was made with."""

    model: LEGOTransformer  # blocks 0..stage: later blocks were not trained yet, so they are left out
    tokenizer: Tokenizer
    config: RunConfig
    stage: int
    run_dir: Path

    def encode(self, text: str) -> Tensor:
        """`text` as a (1, n) batch of token ids, on the model's device."""
        ids = self.tokenizer.encode(text)
        return torch.tensor([ids], dtype=torch.long, device=self.model.embedding.weight.device)

    @torch.no_grad()
    def token_exits(self, text: str) -> list[tuple[str, int]]:
        """Each token of `text` with the block its next-token prediction exited at. The text is cut into
        windows of `data.seq_len` tokens, as the model was trained and evaluated on them."""
        ids, seq_len = self.encode(text), self.config.data.seq_len
        blocks: list[int] = []
        for start in range(0, ids.shape[1], seq_len):
            _, stats = self.model(ids[:, start : start + seq_len], return_stats=True)
            blocks += stats.exit_block[0].tolist()
        return [(self.tokenizer.decode([token]), block) for token, block in zip(ids[0].tolist(), blocks, strict=True)]

    def prepare_data(self, cache_dir: str | Path | None = None) -> PreparedData:
        """The run's train/val/test windows (`.test`: what results.json scores), tokenized by the run's own
        tokenizer.json. `cache_dir` defaults to train.py's: $LEGO_CACHE_DIR, else ~/.cache/lego."""
        tokenizer = TokenizerConfig(kind="file", path=str(self.run_dir / "tokenizer.json"))
        cache_dir = cache_dir or os.environ.get("LEGO_CACHE_DIR", "~/.cache/lego")
        return prepare_data(self.config.data, tokenizer, cache_dir=cache_dir, progress=False)


def load_run(run_dir: str | Path, stage: int | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model a train.py run left in `run_dir` after `stage` (default: its last complete stage),
    with its tokenizer and config. Anything missing or damaged is a one-line DataError naming the path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a directory; give the run directory train.py wrote (outputs/<exp>/<date>)")
    config = _run_config(run_dir / "run_config.json")
    if config.method not in ("lego", "mod"):
        raise DataError(
            f"{run_dir} is a method={config.method} run; load_run rebuilds method=lego and method=mod runs only (a "
            "Universal model's routing comes from its universal config, lego.methods.universal_config)"
        )
    stage = _pick_stage(run_dir, len(config.block_schedule.blocks), stage)
    tokenizer_path = run_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path} is missing; the run directory is incomplete")
    tokenizer = Tokenizer.from_file(tokenizer_path, kind=config.tokenizer.kind)
    model = LEGOTransformer.from_config(model_config(config, tokenizer.vocab_size))
    if config.method == "mod":  # its routers (and their causal thresholds) are in the weights file
        to_mod(model, mod_config(config.mod))
    load_weights(model, run_dir / f"stage_{stage}" / "model.safetensors")
    del model.blocks[stage + 1 :]  # the file holds the whole model, its later blocks still as initialised
    return LoadedRun(model.to(device).eval(), tokenizer, config, stage, run_dir)


def _run_config(path: Path) -> RunConfig:
    """run_config.json as the typed RunConfig (the keys it leaves out, as volatile, take their defaults)."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {path.parent} is not a train.py run directory, or its run never started")
    try:
        return to_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), read_json(path)))
    except (OmegaConfBaseException, ConfigError) as err:
        reason = str(err).splitlines()[0]
        raise DataError(
            f"{path} does not fit this code's config ({reason}); load it with the code that made it"
        ) from err


def _pick_stage(run_dir: Path, n_stages: int, stage: int | None) -> int:
    """The requested stage, checked to be complete (its stats.json is written last), or the last complete one."""
    complete = [k for k in range(n_stages) if (run_dir / f"stage_{k}" / "stats.json").is_file()]
    if stage is None:
        if not complete:
            raise DataError(
                f"{run_dir} has no complete stage (no stage_<k>/stats.json); finish training it by re-running "
                f"train.py with hydra.run.dir={run_dir}"
            )
        return complete[-1]
    if not 0 <= stage < n_stages:
        raise DataError(f"{run_dir} has stages 0 to {n_stages - 1}; stage={stage} is out of range")
    if stage not in complete:
        raise DataError(
            f"{run_dir / f'stage_{stage}'} is not complete (no stats.json); resume the run (train.py with "
            f"hydra.run.dir={run_dir}) or load an earlier stage"
        )
    return stage
