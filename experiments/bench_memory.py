"""Memory of a LEGO stage: bytes per token of a dumped TrainingData, and peak RSS of a stage as the corpus
grows, with the dump held in memory vs streamed from disk (memory-mapped, as the runner does).

Each stage runs in a fresh subprocess (Block 1: a few training steps, then hard-token collection for
the next stage) and reports its peak *owned* memory (RssAnon, sampled every 20 ms) beside its peak
total RSS. Pages of a memory-mapped dump count in total RSS but are page cache, which the OS drops
under pressure; owned memory cannot be dropped. In memory, owned memory grows with the corpus (the
dump is read whole and the next one is built in memory); streamed, it should stay flat.

    python experiments/bench_memory.py                                # dim 256, 2000 and 4000 sequences of 128
    python experiments/bench_memory.py --sequences 50 100 --dim 32    # smoke size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from lego import FitConfig, LEGOBlock
from lego.training_data import HiddenStateWriter, load_within_budget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--stage", nargs=2, metavar=("DUMP", "MODE"), help=argparse.SUPPRESS)  # worker mode
    return parser.parse_args(argv)


def write_dump(path: Path, sequences: int, seq: int, dim: int, vocab: int) -> None:
    """A synthetic stage dump (half the tokens hard), written in chunks so this process stays small."""
    gen = torch.Generator().manual_seed(0)
    with HiddenStateWriter(path, sequences, seq, dim) as writer:
        for start in range(0, sequences, 256):
            rows = slice(start, min(start + 256, sequences))
            writer.hidden[rows] = torch.randn(rows.stop - rows.start, seq, dim, generator=gen)
        writer.finish(
            torch.randint(0, vocab, (sequences, seq), generator=gen), torch.rand(sequences, seq, generator=gen) < 0.5
        )


class AnonPeak:
    """Samples RssAnon from /proc/self/status in a thread (Linux): the kernel keeps no peak of it."""

    def __init__(self) -> None:
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def run_stage(dump: Path, mode: str, vocab: int) -> dict:
    """Worker: Block 1's stage on the dump, in memory or streamed; peak owned and total memory in MB.
    The two modes are the runner's `trainer.memory_budget_mb` set to null (never stream) and to 0."""
    anon = AnonPeak()
    streamed = mode == "streamed"
    budget = 0.0 if streamed else None
    train = load_within_budget(dump, budget)
    val = train.select(torch.arange(min(64, train.num_sequences)))  # a small copy, as a real val set
    torch.manual_seed(0)
    block = LEGOBlock(train.hidden_states.shape[-1], 4, 2, max_seq_len=train.seq_len)
    block.attach_head(torch.nn.Linear(block.dim, vocab, bias=False).requires_grad_(False))
    out = dump.with_name(f"next_{mode}.safetensors")
    config = FitConfig(
        max_steps=20, batch_size=16, warmup_steps=1, hard_ratio=0.5, hard_data_path=str(out), memory_budget_mb=budget
    )
    block.fit(train, val, config)
    return {"owned_mb": anon.stop(), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(Path(args.stage[0]), args.stage[1], args.vocab)))
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="lego-bench-mem-") as tmp:
        for sequences in args.sequences:
            dump = Path(tmp) / f"dump_{sequences}.safetensors"
            write_dump(dump, sequences, args.seq, args.dim, args.vocab)
            tokens = sequences * args.seq
            row = {
                "tokens": tokens,
                "dump_mb": dump.stat().st_size / 2**20,
                "bytes_per_token": dump.stat().st_size / tokens,
            }
            for mode in ("in_memory", "streamed"):
                command = [sys.executable, __file__, "--stage", str(dump), mode, "--vocab", str(args.vocab)]
                proc = subprocess.run(command, capture_output=True, text=True, check=True)
                row[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            dump.unlink()
    print(
        f"stage memory: dim {args.dim}, seq {args.seq}; a dump costs 4*dim + 5 = {4 * args.dim + 5} bytes/token "
        "(float32 state, int32 target, bool mask)"
    )
    print(
        f"{'tokens':>10} {'dump MB':>8} {'B/token':>8} {'in memory: owned / total RSS':>30} "
        f"{'streamed: owned / total RSS':>29}"
    )
    for row in rows:
        mem, stream = row["in_memory"], row["streamed"]
        print(
            f"{row['tokens']:>10,} {row['dump_mb']:>8.0f} {row['bytes_per_token']:>8.0f} "
            f"{mem['owned_mb']:>19.0f} / {mem['rss_mb']:>5.0f} MB "
            f"{stream['owned_mb']:>18.0f} / {stream['rss_mb']:>5.0f} MB"
        )
    if len(rows) > 1:
        extra_dump = max(rows[-1]["dump_mb"] - rows[0]["dump_mb"], 1e-9)
        grow = {
            mode: (rows[-1][mode]["owned_mb"] - rows[0][mode]["owned_mb"]) / extra_dump
            for mode in ("in_memory", "streamed")
        }
        print(f"owned memory growth per MB of dump: in memory {grow['in_memory']:.2f}, streamed {grow['streamed']:.2f}")
    return rows


if __name__ == "__main__":
    main()
