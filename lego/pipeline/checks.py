"""Warnings about a run that trains without error but learns or measures little: a small corpus's symptoms.

A config can be valid and still give numbers that mean nothing: a warm-up longer than the stage (the learning
rate never reaches its peak), a validation or test split too small for its PPL to be measured, a model that ends
worse than the unigram baseline. Each is one line starting with `warning: `, printed as soon as it is known: on
stderr before training (the splits) or before its stage trains (the warm-up), and in the final summary (the test
PPL). The run goes on (README.md, "Small corpora").
"""

from __future__ import annotations

import sys

from lego import distributed
from lego.data import DataConfig

# A PPL's relative standard error is about sd(per-token loss) / sqrt(tokens): the losses of a BPE-4096 model at
# PPL 322 spread by 2.66 nats, so 10,000 tokens measure its PPL to +-2.7 % and 645 tokens to +-10.5 %
# (experiments/eval_noise.py; README.md, "Small corpora"). Below this bound a split's PPL moves by more than the
# differences the study resolves.
MIN_EVAL_TOKENS = 10_000


def warn(message: str) -> None:
    """One `warning: ` line on stderr, from rank 0 only: every rank runs the same checks."""
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr)


def warn_small_splits(summary: dict, data: DataConfig) -> None:
    """Before training: the validation split (early stopping, thresholds) or the test split (the reported PPL)
    holds fewer than MIN_EVAL_TOKENS tokens. A split cut by `data.max_eval_tokens` counts as the cap: cutting it
    to whole windows drops less than one (10,000 gives 9,933 tokens in windows of 129)."""
    window = summary["seq_len"] + 1
    cap = data.max_eval_tokens
    for split, name, fraction in (("val", "validation", "data.val_fraction"), ("test", "test", "data.test_fraction")):
        tokens = summary["tokens"][split]
        capped = cap is not None and tokens > cap - window
        if (cap if capped else tokens) >= MIN_EVAL_TOKENS:
            continue
        fix = f"raise {fraction} or add text"
        if capped:
            fix = f"set data.max_eval_tokens={MIN_EVAL_TOKENS} or more (now {cap})"
        warn(
            f"the {name} split has {tokens:,} tokens, fewer than {MIN_EVAL_TOKENS:,}: too few to measure a PPL on "
            f"(another sample would move it by several percent); {fix}"
        )


def warn_long_warmup(label: str, key: str, warmup_steps: int, steps: int) -> None:
    """Before a stage trains: its warm-up is longer than the stage, so the learning rate never reaches its peak
    (`lego.training.optim.lr_schedule`) and the cosine decay never starts. `key` is the stage's config node."""
    if warmup_steps > steps:
        warn(
            f"{label} trains {steps:,} step{'s' * (steps != 1)} but warms up over {warmup_steps:,} "
            f"({key}.warmup_steps): its learning rate never reaches its peak; set {key}.warmup_steps="
            f"{max(1, steps // 10)} (a tenth of the steps) or train longer"
        )


def worse_than_unigram(results: dict) -> list[str]:
    """The summary's warning line when the test PPL is above the unigram baseline (none otherwise): the model
    predicts worse than the training split's token frequencies."""
    if results["test_ppl"] <= results["unigram_ppl"]:
        return []
    return [
        f"warning: test PPL {results['test_ppl']:.2f} is above the unigram baseline {results['unigram_ppl']:.1f}: "
        "the model predicts worse than token frequencies (too little text or too few steps for it; README.md, "
        '"Small corpora")'
    ]
