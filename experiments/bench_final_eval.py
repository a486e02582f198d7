"""The final evaluation's threshold scan: one read of each split for every setting against one read per setting.

A run's final evaluation scores the test and validation splits with the calibrated exits and at every exit share
of `trainer.threshold_scan`. It used to make one pass over a split per setting; `threshold_scan` now makes one per
split (`evaluate_settings`: Block 0 once per batch, the later blocks once per setting on the tokens that setting
leaves them). Both are timed here side by side, in alternating rounds, on the same model and windows, and their
results checked equal. The speed-up timing that follows the scan (`measure_speedup`) is the same in both.

    python experiments/bench_final_eval.py --run outputs/small/<date>_<time>   # a finished train.py run (the main job)
    python experiments/bench_final_eval.py --dim 32 --seq 16 --windows 16 --repeats 1        # smoke size, random model
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from experiments.bench_common import interleaved_seconds, per_round_ratios, size_parser
from lego import LEGOConfig, LEGOTransformer
from lego.pipeline.evaluation import exit_share_thresholds, threshold_scan
from lego.training.routing import evaluate_settings

SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # trainer.threshold_scan's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = size_parser(__doc__, layers=2, repeats=3, vocab=True)
    parser.add_argument("--run", help="a finished train.py run directory: its model, calibration and splits")
    parser.add_argument("--windows", type=int, default=256, help="windows per split of the random model")
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[LEGOTransformer, torch.Tensor, torch.Tensor, int, str]:
    """The model, validation and test windows, evaluation batch size, and a description."""
    if args.run:
        from lego.pipeline.loading import load_run

        run = load_run(args.run)
        data = run.prepare_data()
        return run.model, data.val, data.test, run.config.trainer.eval_batch_size, f"run {args.run}"
    torch.manual_seed(0)
    config = LEGOConfig(args.vocab, args.dim, args.heads, [args.layers, args.layers], max_seq_len=args.seq)
    model = LEGOTransformer.from_config(config).eval()
    with torch.no_grad():  # random confidences would all sit near 0.5: spread them like a trained classifier's
        model.blocks[0].exit_classifier.weight.normal_(0, 1.0)
    gen = torch.Generator().manual_seed(0)
    val, test = (torch.randint(0, args.vocab, (args.windows, args.seq + 1), generator=gen) for _ in range(2))
    model.blocks[0].threshold = exit_share_thresholds(model, val, [0.5], args.batch, "cpu")[0.5][0]
    return model, val, test, args.batch, f"random model dim {args.dim}, {args.windows} windows of {args.seq}"


def per_setting(model, val, test, batch: int, also: list[list[float]]) -> list[dict]:
    """The former scan: the shares' thresholds, then one pass over a split per setting."""
    shares = sorted({0.0, *SHARES})
    thresholds = exit_share_thresholds(model, val, shares, batch, "cpu")
    tests = [evaluate_settings(model, test, [setting], batch, "cpu")[0] for setting in [*also, *thresholds.values()]]
    vals = [evaluate_settings(model, val, [setting], batch, "cpu")[0] for setting in also]
    return [*tests, *vals]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, val, test, batch, what = setup(args)
    calibrated = [[block.threshold for block in model.blocks]]
    outputs = {}

    def run(point: str) -> None:
        with torch.no_grad():
            if point == "one read":
                rows, tests, vals = threshold_scan(model, val, test, list(SHARES), batch, "cpu", also=calibrated)
                outputs[point] = [tests[0]["ppl"], *sorted(row["test_ppl"] for row in rows), vals[0]["ppl"]]
            else:
                results = per_setting(model, val, test, batch, calibrated)
                outputs[point] = [results[0]["ppl"], *sorted(r["ppl"] for r in results[1:-1]), results[-1]["ppl"]]

    started = time.perf_counter()
    times = interleaved_seconds(["per setting", "one read"], run, args.repeats)
    ratios = per_round_ratios(times, "one read", "per setting")
    same = all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(*outputs.values(), strict=True))
    tokens = (len(val) + len(test)) * (test.shape[1] - 1)
    print(f"threshold scan of {len(SHARES)} exit shares + the calibrated exits, {what}, {len(model.blocks)} blocks, "
          f"{tokens:,} val + test tokens, {torch.get_num_threads()} threads, {args.repeats} rounds "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    print("| evaluation | median seconds | rounds |")
    print("| --- | ---: | --- |")
    for point, seconds in times.items():
        print(f"| {point} | {statistics.median(seconds):.2f} | {', '.join(f'{s:.2f}' for s in seconds)} |")
    print(f"one read is {statistics.median(ratios):.2f}x faster (per round: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"PPLs {'equal' if same else 'DIFFER'} (rel 1e-5)")  # fmt: skip
    return {"seconds": {p: statistics.median(s) for p, s in times.items()}, "speedup": statistics.median(ratios),
            "same": same}  # fmt: skip


if __name__ == "__main__":
    main()
