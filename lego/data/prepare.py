"""prepare_data: corpus -> documents -> spans split train/val/test -> tokenizer -> token windows.

The two slow steps are cached on disk, each keyed by everything it depends on: the BPE tokenizer
(corpus fingerprint + split settings + vocab size) and the token ids of each split (the same + the
tokenizer's own hash). A warm run therefore only fingerprints the corpus and reads one .npz file.
Sequence length and token caps are applied after the cache, so changing them costs nothing.
"""

import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lego.atomic import atomic_write
from lego.data.cache import cache_key
from lego.data.config import DataConfig, TokenizerConfig
from lego.data.sources import load_documents
from lego.data.splits import SPLITS, assign_spans, make_spans
from lego.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from lego.errors import DataError

_ENCODE_BATCH = 64  # spans per encode_batch call: big enough to keep all cores busy, small for progress


@dataclass
class PreparedData:
    """Token windows of shape (n_windows, seq_len + 1), int64: inputs are w[:, :-1], targets w[:, 1:]."""

    train: torch.Tensor
    val: torch.Tensor  # early stopping and threshold calibration
    test: torch.Tensor  # final numbers only
    vocab_size: int
    tokenizer: Tokenizer
    summary: dict[str, Any]

    def unigram_ppl(self) -> float:
        """Perplexity on the test targets of an add-one-smoothed unigram model fitted on train: the
        baseline any trained model must beat."""
        counts = torch.bincount(self.train.flatten(), minlength=self.vocab_size).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        return math.exp(-log_probs[self.test[:, 1:].flatten()].mean().item())

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, targets), each (batch, seq_len); the last batch may be smaller."""
        windows: torch.Tensor = getattr(self, split)
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
    cache_dir = Path(cache_dir).expanduser()
    started = time.perf_counter()

    documents = load_documents(data, cache_dir, progress=progress)
    # `_fingerprint` is how `datasets` itself identifies a dataset's content in its cache.
    split_key = cache_key(
        "split", documents._fingerprint, data.split_seed, data.val_fraction, data.test_fraction, data.span_chars
    )

    @functools.cache
    def split_texts() -> dict[str, list[str]]:
        """Only runs when a cache misses: warm runs never materialise the text."""
        try:
            spans = make_spans(documents["text"], data.span_chars)
        except UnicodeDecodeError as e:  # json and parquet readers let invalid UTF-8 through to here
            raise DataError(
                f"the corpus contains text that is not valid UTF-8 ({e.reason} at byte {e.start} of a "
                "row); convert or remove the offending file in data.files"
            ) from e
        if not spans:
            raise DataError(
                "the corpus contains no text (every document is empty); check data.files and data.text_column"
            )
        index = assign_spans(len(spans), data.val_fraction, data.test_fraction, data.split_seed)
        return {split: [spans[i] for i in index[split]] for split in SPLITS}

    t0 = time.perf_counter()
    tok, tokenizer_cached = _get_tokenizer(tokenizer, split_key, split_texts, cache_dir, progress)
    tokenizer_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens_path = cache_dir / "tokens" / f"{cache_key(split_key, tok.fingerprint)}.npz"
    tokens_cached = tokens_path.is_file()
    if tokens_cached:
        tokens, meta = _load_tokens(tokens_path)
    else:
        texts = split_texts()
        tokens = {split: _encode(tok, texts[split], split, progress) for split in SPLITS}
        meta = {
            "documents": sum(1 for doc in documents["text"] if doc and doc.strip()),
            "spans": {split: len(texts[split]) for split in SPLITS},
            "chars": {split: sum(map(len, texts[split])) for split in SPLITS},
        }
        _save_tokens(tokens_path, tokens, meta)
    tokenize_seconds = time.perf_counter() - t0

    caps = {"train": data.max_train_tokens, "val": data.max_eval_tokens, "test": data.max_eval_tokens}
    windows = {split: _windows(tokens[split], data.seq_len, caps[split], split) for split in SPLITS}
    summary = {
        "source": data.source,
        "documents": meta["documents"],
        "spans": meta["spans"],
        "chars": meta["chars"],
        "tokens": {split: windows[split].numel() for split in SPLITS},
        "windows": {split: len(windows[split]) for split in SPLITS},
        "seq_len": data.seq_len,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "tokenizer_seconds": tokenizer_seconds,
        "tokenizer_cached": tokenizer_cached,
        "tokenize_seconds": tokenize_seconds,
        "tokens_cached": tokens_cached,
        "seconds": time.perf_counter() - started,
        "fingerprint": tokens_path.stem,
    }
    return PreparedData(
        train=windows["train"],
        val=windows["val"],
        test=windows["test"],
        vocab_size=tok.vocab_size,
        tokenizer=tok,
        summary=summary,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A three-line human summary of what prepare_data produced and how long it took."""
    tokens, windows, spans = summary["tokens"], summary["windows"], summary["spans"]
    trained = "cached" if summary["tokenizer_cached"] else f"built in {summary['tokenizer_seconds']:.1f}s"
    tokenized = "cached" if summary["tokens_cached"] else "fresh"
    return "\n".join(
        [
            f"data: {summary['source']}, {summary['documents']} documents, {sum(spans.values())} spans "
            f"(train {spans['train']} / val {spans['val']} / test {spans['test']})",
            f"tokens: train {tokens['train']:,} / val {tokens['val']:,} / test {tokens['test']:,} in windows of "
            f"{summary['seq_len'] + 1} ({windows['train']:,} / {windows['val']:,} / {windows['test']:,})",
            f"tokenizer: {summary['tokenizer']}, vocab {summary['vocab_size']:,} ({trained}); tokenization "
            f"{summary['tokenize_seconds']:.2f}s ({tokenized}); fingerprint {summary['fingerprint']}",
        ]
    )


def _get_tokenizer(
    cfg: TokenizerConfig,
    split_key: str,
    split_texts: Callable[[], dict[str, list[str]]],
    cache_dir: Path,
    progress: bool,
) -> tuple[Tokenizer, bool]:
    """The configured tokenizer, and whether it came from the cache (only `bpe` is trained and cached)."""
    if cfg.kind == "bytes":
        return byte_tokenizer(), False
    if cfg.kind == "file":
        return Tokenizer.from_file(cfg.path), False
    path = cache_dir / "tokenizers" / f"bpe-{cache_key(split_key, cfg.vocab_size)}.json"
    if path.is_file():
        return Tokenizer.from_file(path, kind="bpe"), True
    tok = train_bpe(split_texts()["train"], cfg.vocab_size, progress=progress)
    tok.save(path)
    return tok, False


def _encode(tok: Tokenizer, spans: list[str], split: str, progress: bool) -> np.ndarray:
    """Encode spans in order into one flat id array (uint16 when the vocab fits, to halve the cache)."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    chunks = []
    with tqdm(
        total=sum(map(len, spans)),
        desc=f"tokenizing {split}",
        unit="char",
        unit_scale=True,
        delay=1.0,
        disable=not progress,
    ) as bar:
        for start in range(0, len(spans), _ENCODE_BATCH):
            batch = spans[start : start + _ENCODE_BATCH]
            chunks.extend(np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(batch))
            bar.update(sum(map(len, batch)))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _save_tokens(path: Path, tokens: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, meta=np.array(json.dumps(meta)), **tokens)

    atomic_write(path, write)


def _load_tokens(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as archive:
        return {split: archive[split] for split in SPLITS}, json.loads(str(archive["meta"]))


def _windows(tokens: np.ndarray, seq_len: int, cap: int | None, split: str) -> torch.Tensor:
    """Cut the (optionally capped) token stream into non-overlapping windows of seq_len + 1 tokens."""
    tokens = tokens[:cap]
    n = len(tokens) // (seq_len + 1)
    if n == 0:
        fix = "lower data.seq_len or use a larger corpus"
        if split != "train":
            fix += f" or raise data.{split}_fraction"
        raise DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than one sequence of "
            f"data.seq_len + 1 = {seq_len + 1}; {fix}"
        )
    return torch.from_numpy(tokens[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
