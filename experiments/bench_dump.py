"""Hard-token dumps (`trainer.dump`, `trainer.dump_dtype`): bytes per token, the next block's PPL, and time.

One Block 0 trains on the embedded corpus (the `small` model: dim 256, 4 heads, 2 layers, BPE 4096,
seq 128) and collects its hard tokens (hard_ratio 0.5). Then, side by side in one run:
- each format's file: float32 dump, bfloat16 dump (the default), and `trainer.dump=none`'s token ids with
  the hard mask; bytes per token measured on the files;
- Block 1 trained from the same initial weights on the float32 and on the bfloat16 dump: its best
  validation PPL (on the tokens Block 0 passes on, as the stage line reports it) and the whole model's
  test PPL with early exit. A second float32 run with another shuffle seed is the yardstick: a format
  whose effect is below that seed-to-seed difference does not change results measurably. (`none` hands
  Block 1 the float32 states themselves: tests/pipeline/test_stage_dumps.py);
- the time to get Block 1's inputs when a run resumes after stage 0: read either dump, or recompute
  them by running Block 0 over the token ids (`none`); and the time to collect them at the end of stage 0:
  written to a float32 or bfloat16 file, or kept in memory (`none`). Medians, timed round robin.

    python experiments/bench_dump.py                         # 240k training tokens, a few minutes
    python experiments/bench_dump.py --train-tokens 20000 --dim 32 --repeats 1    # smoke size
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from experiments.bench_common import median_seconds
from lego import FitConfig, LEGOConfig, LEGOTransformer, TrainingData
from lego.data import DataConfig, TokenizerConfig, prepare_data
from lego.fitting import DUMP_DTYPES
from lego.training.propagation import propagate, propagate_to_file
from lego.training.routing import evaluate_routed, route
from lego.training.selection import select_hard
from lego.training_data import load_within_budget

HARD_RATIO = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-tokens", type=int, default=240_000)
    parser.add_argument("--eval-tokens", type=int, default=30_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default="~/.cache/lego")
    return parser.parse_args(argv)


def fit_config(**overrides) -> FitConfig:
    """The `small` preset's stage settings (conf/block_schedule/two_blocks.yaml, data.batch_size 16)."""
    return FitConfig(**{"epochs": 1, "lr": 1e-3, "batch_size": 16, "eval_batch_size": 64, **overrides})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = DataConfig(seq_len=args.seq, max_train_tokens=args.train_tokens, max_eval_tokens=args.eval_tokens)
    prepared = prepare_data(data, TokenizerConfig(), cache_dir=args.cache_dir, progress=False)
    train, val = TrainingData.from_windows(prepared.train), TrainingData.from_windows(prepared.val)
    torch.manual_seed(0)
    config = LEGOConfig(
        vocab_size=prepared.vocab_size, dim=args.dim, num_heads=args.heads, layers_per_block=[args.layers] * 2,
        max_seq_len=args.seq,
    )  # fmt: skip
    model = LEGOTransformer.from_config(config)
    block0, embedding = model.blocks[0], model.embedding
    _, stats0 = block0.fit(train, val, fit_config(hard_ratio=HARD_RATIO), embedding=embedding)
    routed_val = route(block0, val, embedding, 64)

    with tempfile.TemporaryDirectory(prefix="lego-bench-dump-") as tmp:
        paths = {dtype: Path(tmp) / f"{dtype}.safetensors" for dtype in DUMP_DTYPES}

        def pick_hard(confidence: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return select_hard(confidence, train.active, HARD_RATIO)

        def collect(point: str) -> None:
            """The end of stage 0 as `fit_block` runs it: the hard tokens to a file, or kept in memory."""
            if point == "none":
                propagate(block0, train, embedding, 64)
            else:
                propagate_to_file(block0, train, embedding, 64, paths[point], pick_hard, DUMP_DTYPES[point])

        collect_seconds = median_seconds(["float32", "bfloat16", "none"], collect, args.repeats)
        dumps = {dtype: load_within_budget(path, None) for dtype, path in paths.items()}
        mask_path = Path(tmp) / "hard_mask.safetensors"
        TrainingData(None, train.targets, dumps["float32"].active, train.input_ids).save(mask_path)
        tokens = train.targets.numel()
        sizes = {"float32": paths["float32"], "bfloat16": paths["bfloat16"], "none": mask_path}
        bytes_per_token = {name: path.stat().st_size / tokens for name, path in sizes.items()}

        def inputs(point: str) -> None:
            """What a resume after stage 0 does to get Block 1's inputs (`trainer.memory_budget_mb` = null)."""
            if point == "none":
                propagate(block0, train, embedding, 64)
            else:
                load_within_budget(paths[point], None)

        resume_seconds = median_seconds(["float32", "bfloat16", "none"], inputs, args.repeats)

    runs = {}
    for name, dtype, seed in (("float32", "float32", 1), ("bfloat16", "bfloat16", 1), ("seed 2", "float32", 2)):
        trained = copy.deepcopy(model)  # the same Block 1 initial weights for every run
        _, stats = trained.blocks[1].fit(dumps[dtype], routed_val, fit_config(hard_ratio=None, seed=seed))
        test_ppl = evaluate_routed(trained, prepared.test, 64, "cpu")["ppl"]
        runs[name] = {"val_ppl": stats.best_val_ppl, "test_ppl": test_ppl}

    holding = float(dumps["float32"].active.any(dim=1).float().mean())
    print(
        f"hard-token dumps: Block 0 ({args.layers} layers, dim {args.dim}) on {tokens:,} training tokens "
        f"({train.num_sequences:,} sequences of {args.seq}), hard_ratio {HARD_RATIO}; {holding:.1%} of the "
        f"sequences hold a hard token; Block 0 trained in {stats0.seconds:.0f}s"
    )
    print(f"{'format':<32} {'B/token':>8} {'file MB':>8} {'Block 1 val PPL':>16} {'test PPL':>9}")
    labels = {"float32": "float32 dump", "bfloat16": "bfloat16 dump (default)", "none": "none (token ids + hard mask)"}
    for name, label in labels.items():
        run = runs.get(name)
        ppls = f"{run['val_ppl']:>16.2f} {run['test_ppl']:>9.2f}" if run else f"{'(float32 inputs)':>26}"
        print(f"{label:<32} {bytes_per_token[name]:>8.1f} {bytes_per_token[name] * tokens / 2**20:>8.1f} {ppls}")
    yardstick = runs["seed 2"]
    print(f"{'float32 dump, shuffle seed 2':<50} {yardstick['val_ppl']:>16.2f} {yardstick['test_ppl']:>9.2f}")
    for key, what in (("val_ppl", "Block 1 val PPL"), ("test_ppl", "test PPL")):
        effect = runs["bfloat16"][key] / runs["float32"][key] - 1
        noise = yardstick[key] / runs["float32"][key] - 1
        print(f"{what}: bfloat16 vs float32 {effect:+.2%}; another shuffle seed {noise:+.2%}")
    collect = ", ".join(
        f"{point} {t:.2f}s ({t / collect_seconds['bfloat16']:.2f}x)" for point, t in collect_seconds.items()
    )
    print(f"collect at the end of stage 0, median of {args.repeats} (x bfloat16 dump): {collect}")
    recompute = resume_seconds["none"]
    print(
        f"Block 1's inputs on resume, median of {args.repeats}: read float32 dump {resume_seconds['float32']:.2f}s, "
        f"read bfloat16 dump {resume_seconds['bfloat16']:.2f}s, recompute (none) {recompute:.2f}s = "
        f"{recompute / stats0.seconds:.1%} of Block 0's training time"
    )
    return {"bytes_per_token": bytes_per_token, "runs": runs, "collect": collect_seconds, "resume": resume_seconds}


if __name__ == "__main__":
    main()
