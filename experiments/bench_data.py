"""Benchmark: prepare the default corpus cold (empty cache) and warm (cached), and print the speed-up.

    python experiments/bench_data.py [--repeats 3]

Cold includes unpacking the embedded corpus, building the `datasets` cache, training the BPE tokenizer
and tokenizing every split; warm should only fingerprint the corpus and read the cached token ids.
Target: warm at least 10x faster than cold.
"""

import argparse
import statistics
import tempfile
import time

from lego.data import DataConfig, TokenizerConfig, format_summary, prepare_data

TARGET_SPEEDUP = 10.0


def timed_prepare(cache_dir: str) -> tuple[float, dict]:
    start = time.perf_counter()
    prepared = prepare_data(DataConfig(), TokenizerConfig(), cache_dir=cache_dir, progress=False)
    return time.perf_counter() - start, prepared.summary


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm runs; the median is reported")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lego-bench-") as cache_dir:
        cold, summary = timed_prepare(cache_dir)
        warm = statistics.median(timed_prepare(cache_dir)[0] for _ in range(args.repeats))

    speedup = cold / warm
    print(format_summary(summary))
    print(
        f"cold {cold:.2f}s  warm {warm:.3f}s (median of {args.repeats})  speed-up {speedup:.0f}x "
        f"({'meets' if speedup >= TARGET_SPEEDUP else 'MISSES'} the {TARGET_SPEEDUP:.0f}x target)"
    )
    return speedup


if __name__ == "__main__":
    main()
