"""The sampling error of a finished run's test PPL: how much a PPL over n tokens moves from the sample alone.

    python experiments/eval_noise.py outputs/<experiment>/<run> [--tokens 645 4000 10000]

A PPL is exp(mean per-token loss), so its relative standard error over n tokens is about sd(loss) / sqrt(n).
The run's final model (its exits and thresholds, as `results.json` scores it) is run over the run's test split,
and for each n two estimates are printed: sd / sqrt(n), and the standard deviation of log PPL over random draws
(with replacement) of whole windows holding n tokens, as a window's tokens are not independent. README.md,
"Small corpora", quotes it for the bound below which a run warns (`lego.pipeline.checks.MIN_EVAL_TOKENS`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lego.data import prepare_data
from lego.model import LEGOTransformer
from lego.pipeline.checks import MIN_EVAL_TOKENS
from lego.pipeline.config import RunConfig, model_config
from lego.pipeline.files import load_weights

RESAMPLES = 400


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (with .hydra/ and stage_*/)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[645, 4000, MIN_EVAL_TOKENS])
    args = parser.parse_args(argv)

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(args.run_dir / ".hydra" / "config.yaml"))
    run: RunConfig = OmegaConf.to_object(cfg)
    prepared = prepare_data(run.data, run.tokenizer, cache_dir=run.cache_dir, progress=False)
    model = LEGOTransformer.from_config(model_config(run, prepared.vocab_size))
    load_weights(model, sorted(args.run_dir.glob("stage_*/model.safetensors"))[-1])  # the last stage: the whole model
    losses = per_token_losses(model, prepared.test, run.trainer.eval_batch_size)
    sd = float(losses.std())
    result = {"tokens": losses.numel(), "test_ppl": math.exp(float(losses.mean())), "loss_sd": sd, "rows": []}
    print(
        f"{args.run_dir}: {losses.numel():,} test tokens, test PPL {result['test_ppl']:.2f}, per-token loss sd {sd:.2f}"
    )
    generator = torch.Generator().manual_seed(0)
    for n in args.tokens:
        windows = max(1, round(n / losses.shape[1]))  # drawn with replacement: a bootstrap over whole windows
        draws = torch.randint(len(losses), (RESAMPLES, windows), generator=generator)
        row = {"n": n, "sd_over_sqrt_n": sd / math.sqrt(n), "resampled": float(losses[draws].mean(dim=(1, 2)).std())}
        result["rows"].append(row)
        print(f"  {n:>7,} tokens: PPL +-{row['sd_over_sqrt_n']:.1%} (sd/sqrt(n)), +-{row['resampled']:.1%} (windows)")
    return result


@torch.no_grad()
def per_token_losses(model: LEGOTransformer, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n_windows, seq) cross-entropy of every test token with the logits of the block it exits at."""
    model.eval()
    rows = []
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        rows.append(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"))
    return torch.cat(rows).view(len(windows), -1)


if __name__ == "__main__":
    main()
