"""Preparation against an older commit's, side by side in one run: the same corpus (the Austen novels repeated to
each size, one file per copy), the same BPE vocabulary, each path in a fresh process with an empty cache (cold),
then again with its cache (warm). Printed per path and size: wall and CPU seconds, tokens per wall second, the
process's peak RSS (its own, from `wait4`; the tokenizer's threads count, worker processes do not), the cache on
disk, and the ratios of this code's numbers to the older path's.

The older path runs from `git archive <commit> lego` (so a clone with its history is needed); its
default, e5adb48^, is the last commit before token shards (issue "a billion tokens on one machine"), the path the
issue measured: windows as int64 in memory, an npz cache, BPE trained on the whole train split.

    python experiments/bench_prep.py                       # 6 and 24 MB of text: a few minutes
    python experiments/bench_prep.py --mb 1 --vocab 512    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench_scale import write_corpus

ROOT = Path(__file__).resolve().parents[1]
BEFORE_SHARDS = "e5adb48^"
PREPARE = """
import json, sys
import lego
from lego.data import DataConfig, TokenizerConfig, prepare_data
files, vocab, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = DataConfig(source="text_files", files=[files], max_eval_tokens=None)
prepared = prepare_data(data, TokenizerConfig(vocab_size=vocab), cache_dir=cache, progress=False)
print(json.dumps({"tokens": sum(prepared.summary["tokens"].values()), "lego": lego.__file__}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[6, 24], help="corpus sizes in MB of text")
    parser.add_argument("--vocab", type=int, default=4096, help="the BPE vocabulary")
    parser.add_argument("--against", default=BEFORE_SHARDS, help=f"the older commit (default: {BEFORE_SHARDS})")
    return parser.parse_args(argv)


def export(commit: str, into: Path) -> Path:
    """`commit`'s lego package under `into` (a folder to put first on PYTHONPATH)."""
    archive = subprocess.run(["git", "archive", commit, "lego"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"error: cannot export {commit}'s lego package ({archive.stderr.decode().strip()}); "
                         "run this from a git clone with its history, or pass --against <a commit it has>")  # fmt: skip
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def prepare(code: Path, corpus: Path, vocab: int, cache: Path) -> dict:
    """One preparation in a fresh process running the lego package under `code`: its wall and CPU seconds, peak
    RSS (MB) and token count."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", PREPARE, f"{corpus}/*.txt", str(vocab), str(cache)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=code, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        out.seek(0)
        output = out.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"preparation with {code} failed:\n{output[-3000:]}")
    ran = json.loads(output.strip().splitlines()[-1])
    if not Path(ran["lego"]).is_relative_to(code):
        raise RuntimeError(f"the preparation meant to run {code}'s lego ran {ran['lego']}")
    tokens = ran["tokens"]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "tokens": tokens}  # fmt: skip


def cache_mb(cache: Path) -> float:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lego-bench-prep-") as tmp:
        paths = {args.against: export(args.against, Path(tmp) / "older"), "this code": ROOT}
        for mb in args.mb:
            corpus = Path(tmp) / f"corpus_{mb:g}"
            write_corpus(corpus, int(mb * 1e6))
            for name, code in paths.items():
                cache = Path(tmp) / f"cache_{mb:g}_{len(rows)}"
                print(f"{mb:g} MB, {name}: cold, then warm ...", flush=True)
                cold, warm = prepare(code, corpus, args.vocab, cache), prepare(code, corpus, args.vocab, cache)
                rows.append({"mb": mb, "path": name, "cold": cold, "warm": warm, "cache_mb": cache_mb(cache)})
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| text MB | path | tokens | cold wall s / CPU s | tokens per wall s | cold peak RSS MB | warm wall s | "
          "warm peak RSS MB | cache MB |")  # fmt: skip
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        cold, warm = row["cold"], row["warm"]
        print(f"| {row['mb']:g} | {row['path']} | {cold['tokens']:,} | {cold['wall_s']:.1f} / {cold['cpu_s']:.1f} | "
              f"{cold['tokens'] / cold['wall_s']:,.0f} | {cold['rss_mb']:.0f} | {warm['wall_s']:.1f} | "
              f"{warm['rss_mb']:.0f} | {row['cache_mb']:.1f} |")  # fmt: skip
    for older, ours in zip(rows[::2], rows[1::2], strict=True):
        speed = (ours["cold"]["tokens"] / ours["cold"]["wall_s"]) / (older["cold"]["tokens"] / older["cold"]["wall_s"])
        print(f"{ours['mb']:g} MB: this code's cold preparation {speed:.2f}x the tokens per second of "
              f"{older['path']}, peak RSS {ours['cold']['rss_mb'] / older['cold']['rss_mb']:.2f}x cold and "
              f"{ours['warm']['rss_mb'] / older['warm']['rss_mb']:.2f}x warm, cache "
              f"{ours['cache_mb'] / older['cache_mb']:.2f}x")


if __name__ == "__main__":
    main()
