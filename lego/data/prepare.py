"""prepare_data: corpus -> documents -> spans split train/val/test -> tokenizer -> token files -> windows.

Each split is stored as one flat token file (`lego.data.tokens`: uint16 where the vocabulary fits, else uint32)
and memory-mapped: windows are offsets into it and a batch is the only int64 copy, so memory does not grow with
the corpus. The corpus is read as a stream, a batch of documents at a time: once to count its spans (the split
deals them by a seeded permutation of their number), once more for the BPE tokenizer's sample (the first
`tokenizer.max_train_chars` characters of the train split), and once to encode them, a batch of spans at a time
on all cores; a killed preparation resumes from its last finished shard.

The two slow steps are cached on disk, each keyed by everything it depends on: the BPE tokenizer (corpus
fingerprint + split settings + vocab size + sample size) and the token files (the same + the tokenizer's own
hash). A warm run therefore only fingerprints the corpus and maps three files. Sequence length and token caps
are applied after the cache, so changing them costs nothing.

`data.source=token_files` skips all of it: the files given are mapped as they are.
"""

import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lego.data.cache import cache_key, entry_lock
from lego.data.config import DataConfig, TokenizerConfig
from lego.data.sources import iter_texts, load_documents
from lego.data.splits import SPLITS, count_spans, iter_spans, span_labels
from lego.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from lego.data.tokens import (
    TokenFileWriter,
    TokenWindows,
    check_token_file,
    map_tokens,
    read_token_files,
    token_dtype,
)
from lego.errors import ConfigError, DataError
from lego.memory import release_freed_memory

# spans per encode_batch call: two per core keep the cores busy; more only holds more of the encoder's per-token
# temporaries (64 spans took ~130 MB more than 16 at the peak of a preparation)
_ENCODE_BATCH = max(16, 2 * (os.cpu_count() or 1))
_COUNT_TOKENS = 1 << 22  # training tokens counted at a time for the unigram baseline


@dataclass
class PreparedData:
    """Token windows (n_windows, seq_len + 1) over the token files: inputs are w[:, :-1], targets w[:, 1:]; any
    batch taken from them is int64."""

    train: TokenWindows
    val: TokenWindows  # early stopping and threshold calibration
    test: TokenWindows  # final numbers only
    vocab_size: int
    tokenizer: Tokenizer
    summary: dict[str, Any]

    def unigram_ppl(self) -> float:
        """Perplexity on the test targets of an add-one-smoothed unigram model fitted on train: the
        baseline any trained model must beat."""
        counts = torch.zeros(self.vocab_size, dtype=torch.long)
        for rows in self.train.split(max(1, _COUNT_TOKENS // self.train.shape[1])):
            counts += torch.bincount(rows.flatten(), minlength=self.vocab_size)
        counts = counts.double() + 1.0
        log_probs = (counts / counts.sum()).log()
        return math.exp(-log_probs[self.test[:, 1:].flatten()].mean().item())

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets), each (batch, seq_len); the last batch may be smaller."""
        windows: TokenWindows = getattr(self, split)
        if shuffle:
            order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(windows))
        for start in range(0, len(windows), batch_size):
            batch = windows[order[start : start + batch_size]]
            yield batch[:, :-1], batch[:, 1:]


def prepare_data(
    data: DataConfig, tokenizer: TokenizerConfig, *, cache_dir: str | Path, progress: bool = True
) -> PreparedData:
    """Load, split, tokenize and window the configured corpus, reusing cached work from earlier runs.

    The split depends on `data.split_seed` only, never on the run's model seed: every seed and method of a
    comparison is scored on the same held-out tokens."""
    data.validate()
    tokenizer.validate()
    started = time.perf_counter()
    if data.source == "token_files":
        return _from_token_files(data, tokenizer, started)
    cache_dir = Path(cache_dir).expanduser()

    documents, fingerprint = load_documents(data, cache_dir, progress=progress)
    release_freed_memory()  # what building the Arrow cache of the documents left
    split_key = cache_key("split", fingerprint, data.split_seed, data.val_fraction, data.test_fraction, data.span_chars)

    def spans() -> Iterator[str]:
        return iter_spans(iter_texts(documents), data.span_chars)

    def labels(span_count: int) -> np.ndarray:
        return span_labels(span_count, data.val_fraction, data.test_fraction, data.split_seed)

    @functools.cache
    def plan() -> dict[str, Any]:
        """One pass over the corpus, only when a cache misses: its documents and spans, per split."""
        documents_with_text, span_count = count_spans(iter_texts(documents), data.span_chars)
        if not span_count:
            raise DataError(
                "the corpus contains no text (every document is empty); check data.files and data.text_column"
            )
        per_split = np.bincount(labels(span_count), minlength=len(SPLITS)).tolist()
        spans_per_split = dict(zip(SPLITS, per_split, strict=True))
        return {"documents": documents_with_text, "span_count": span_count, "spans": spans_per_split}

    def bpe_sample() -> Iterator[str]:
        """The first `tokenizer.max_train_chars` characters of the train split: held-out text never shapes the
        vocabulary."""
        budget = tokenizer.max_train_chars
        for span, label in zip(spans(), labels(plan()["span_count"]), strict=False):
            if SPLITS[label] == "train":
                yield span[:budget]
                budget -= len(span)
                if budget <= 0:
                    return

    t0 = time.perf_counter()
    tok, tokenizer_cached = _get_tokenizer(tokenizer, split_key, bpe_sample, cache_dir, progress)
    tokenizer_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    folder = cache_dir / "tokens" / cache_key(split_key, tok.fingerprint)
    tokenized = "cached"
    if not folder.is_dir():
        with entry_lock(folder):
            if not folder.is_dir():  # else another process finished it while this one waited
                tokenized = _write_tokens(folder, tok, spans, plan, labels, progress)
    tokens, meta = read_token_files(folder)
    tokenize_seconds = time.perf_counter() - t0

    meta = {key: meta[key] for key in ("documents", "spans", "chars")}
    timing = {"tokenizer_seconds": tokenizer_seconds, "tokenizer_cached": tokenizer_cached,
              "tokenize_seconds": tokenize_seconds, "tokenized": tokenized}  # fmt: skip
    return _prepared(data, tok, tokens, {**meta, **timing, "fingerprint": folder.name}, started)


def format_summary(summary: dict[str, Any]) -> str:
    """A three-line human summary of what prepare_data produced and how long it took."""
    tokens, windows, spans = summary["tokens"], summary["windows"], summary["spans"]
    if spans is None:  # token files, used as they are
        files = summary["files"]
        test = files.get("test") or "the second half of val"
        source = f"data: token_files, train {files['train']} / val {files['val']} / test {test}"
        tokenized = "tokens read from the files as they are"
    else:
        source = (
            f"data: {summary['source']}, {summary['documents']} documents, {sum(spans.values())} spans "
            f"(train {spans['train']} / val {spans['val']} / test {spans['test']})"
        )
        tokenized = f"tokenization {summary['tokenize_seconds']:.2f}s ({summary['tokenized']})"
    trained = "cached" if summary["tokenizer_cached"] else f"built in {summary['tokenizer_seconds']:.1f}s"
    return "\n".join(
        [
            source,
            f"tokens: train {tokens['train']:,} / val {tokens['val']:,} / test {tokens['test']:,} in windows of "
            f"{summary['seq_len'] + 1} ({windows['train']:,} / {windows['val']:,} / {windows['test']:,})",
            f"tokenizer: {summary['tokenizer']}, vocab {summary['vocab_size']:,} ({trained}); {tokenized}; "
            f"fingerprint {summary['fingerprint']}",
        ]
    )


def _prepared(
    data: DataConfig, tok: Tokenizer, tokens: dict[str, np.ndarray], meta: dict[str, Any], started: float
) -> PreparedData:
    """The split arrays cut into windows (after the caps), with the summary."""
    caps = {"train": data.max_train_tokens, "val": data.max_eval_tokens, "test": data.max_eval_tokens}
    windows = {split: _windows(tokens[split], data.seq_len, caps[split], split, data.source) for split in SPLITS}
    summary = {
        "source": data.source,
        **meta,
        "tokens": {split: windows[split].numel() for split in SPLITS},
        "windows": {split: len(windows[split]) for split in SPLITS},
        "seq_len": data.seq_len,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "seconds": time.perf_counter() - started,
    }
    return PreparedData(**windows, vocab_size=tok.vocab_size, tokenizer=tok, summary=summary)


def _get_tokenizer(
    cfg: TokenizerConfig,
    split_key: str,
    sample: Callable[[], Iterator[str]],
    cache_dir: Path,
    progress: bool,
) -> tuple[Tokenizer, bool]:
    """The configured tokenizer, and whether it came from the cache (only `bpe` is trained and cached)."""
    if cfg.kind == "bytes":
        return byte_tokenizer(), False
    if cfg.kind == "file":
        return Tokenizer.from_file(cfg.path), False
    path = cache_dir / "tokenizers" / f"bpe-{cache_key(split_key, cfg.vocab_size, cfg.max_train_chars)}.json"
    if path.is_file():
        return Tokenizer.from_file(path, kind="bpe"), True
    tok = train_bpe(sample(), cfg.vocab_size, progress=progress)
    tok.save(path)
    return tok, False


def _write_tokens(
    folder: Path,
    tok: Tokenizer,
    spans: Callable[[], Iterator[str]],
    plan: Callable[[], dict[str, Any]],
    labels: Callable[[int], np.ndarray],
    progress: bool,
) -> str:
    """Encode every span, in corpus order, onto its split's token file under `<folder>.partial` (resuming a killed
    preparation after its last finished shard), then move the finished folder into place. Returns "fresh" or
    "resumed"."""
    partial = folder.with_name(f"{folder.name}.partial")
    with TokenFileWriter(partial, token_dtype(tok.vocab_size), plan) as writer:
        split_of = labels(writer.manifest["span_count"])
        position, encoded, t0 = writer.position, 0, time.perf_counter()
        with tqdm(
            total=len(split_of),
            initial=position,
            desc="tokenizing",
            unit="span",
            delay=1.0,
            disable=not progress,
        ) as bar:
            for batch in _batched(itertools.islice(spans(), position, None), _ENCODE_BATCH):
                if position + len(batch) > len(split_of):
                    break  # the corpus changed since its spans were counted: refused below
                ids = tok.encode_batch(batch)
                writer.add(
                    [
                        (SPLITS[split_of[position + i]], x, len(t))
                        for i, (t, x) in enumerate(zip(batch, ids, strict=True))
                    ]
                )
                position += len(batch)
                encoded += sum(map(len, ids))
                bar.update(len(batch))
                bar.set_postfix_str(f"{encoded / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
        if position != len(split_of):
            raise DataError(
                f"the corpus changed while it was prepared ({len(split_of)} spans when counted, now another "
                f"number); delete {partial} and run again"
            )
        resumed = writer.resumed
    os.replace(partial, folder)
    return "resumed" if resumed else "fresh"


def _from_token_files(data: DataConfig, cfg: TokenizerConfig, started: float) -> PreparedData:
    """`data.source=token_files`: the given files are the splits, mapped as they are; without a test file, the
    second half of the val file is the test split (nanoGPT's layout has train.bin and val.bin only)."""
    if cfg.kind == "bpe":
        raise ConfigError(
            "data=token_files holds token ids already: give the tokenizer they were made with, "
            "tokenizer=file tokenizer.path=... (or tokenizer=bytes for byte ids)"
        )
    tok = byte_tokenizer() if cfg.kind == "bytes" else Tokenizer.from_file(cfg.path)
    dtype = np.dtype(data.token_dtype)
    paths = {split: Path(path).expanduser() for split, path in data.token_files.items() if path}
    for split, path in paths.items():
        check_token_file(path, dtype, tok.vocab_size, f"data.token_files.{split}")
    tokens = {split: map_tokens(path, dtype) for split, path in paths.items()}
    if "test" not in tokens:
        half = len(tokens["val"]) // 2
        tokens["val"], tokens["test"] = tokens["val"][:half], tokens["val"][half:]
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in paths.values()]
    meta = {
        "documents": None,
        "spans": None,
        "chars": None,
        "files": {split: str(path) for split, path in paths.items()},
        "tokenizer_seconds": 0.0,
        "tokenizer_cached": False,
        "tokenize_seconds": 0.0,
        "tokenized": "none",
        "fingerprint": cache_key("token_files", stats, dtype.name, tok.fingerprint),
    }
    return _prepared(data, tok, tokens, meta, started)


def _batched(items: Iterator[str], n: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, n)):
        yield batch


def _windows(tokens: np.ndarray, seq_len: int, cap: int | None, split: str, source: str) -> TokenWindows:
    """Non-overlapping windows of seq_len + 1 over the first `cap` tokens (a view: nothing is copied)."""
    tokens = tokens[:cap]
    windows = TokenWindows(tokens, seq_len)
    if len(windows) == 0:
        fix = "lower data.seq_len or use a larger corpus"
        if split != "train" and source != "token_files":
            fix += f" or raise data.{split}_fraction"
        raise DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than one sequence of "
            f"data.seq_len + 1 = {seq_len + 1}; {fix}"
        )
    return windows
