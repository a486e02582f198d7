"""Train/validation/test split by contiguous spans of text, never by individual tokens.

Documents are cut into spans of about `span_chars` characters (at line breaks where possible), and
short consecutive documents are packed into one span, so corpora with a few long documents (Austen's six
novels) and corpora with many short rows (wikitext lines, jsonl records) are both split into units of
similar size. Whole spans are then dealt to the splits by a seeded permutation: held-out text is
contiguous and never appears in training, and the same seed always gives the same split.
"""

from collections.abc import Iterable, Iterator

import numpy as np

from lego.errors import DataError

SPLITS = ("train", "val", "test")


def make_spans(documents: Iterable[str | None], span_chars: int) -> list[str]:
    """All of `iter_spans` as a list."""
    return list(iter_spans(documents, span_chars))


def iter_spans(documents: Iterable[str | None], span_chars: int) -> Iterator[str]:
    """Cut long documents and pack short ones into spans of roughly `span_chars` characters, in order, one at a
    time (a corpus is read as a stream); spans of whitespace only are dropped.

    Each document is made to end with a newline, so that spans concatenate into readable text.
    """
    packed = ""  # consecutive short documents waiting to fill a span
    for doc in documents:
        doc = doc or ""
        if not doc.endswith("\n"):
            doc += "\n"
        if len(doc) < span_chars:
            packed += doc
            if len(packed) >= span_chars:
                yield from _kept([packed])
                packed = ""
            continue
        yield from _kept([packed, *_cut(doc, span_chars)])
        packed = ""
    yield from _kept([packed])


def count_spans(documents: Iterable[str | None], span_chars: int) -> tuple[int, int]:
    """How many documents hold text and how many spans `iter_spans` cuts, in one pass over a stream."""
    with_text = 0

    def counted() -> Iterator[str | None]:
        nonlocal with_text
        for doc in documents:
            with_text += bool(doc and doc.strip())
            yield doc

    spans = sum(1 for _ in iter_spans(counted(), span_chars))
    return with_text, spans


def _kept(spans: list[str]) -> list[str]:
    return [s for s in spans if s.strip()]


def _cut(doc: str, span_chars: int) -> list[str]:
    """Cut one long document into pieces of at most `span_chars`, ending at a line break when one is near."""
    pieces = []
    start = 0
    while start < len(doc):
        end = min(start + span_chars, len(doc))
        if end < len(doc):
            newline = doc.rfind("\n", start + span_chars // 2, end)
            if newline != -1:
                end = newline + 1
        pieces.append(doc[start:end])
        start = end
    return pieces


def span_labels(n_spans: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """`assign_spans` as one split index per span (0 train, 1 val, 2 test: positions in SPLITS)."""
    index = assign_spans(n_spans, val_fraction, test_fraction, seed)
    labels = np.zeros(n_spans, dtype=np.int8)
    for label, split in enumerate(SPLITS):
        labels[index[split]] = label
    return labels


def assign_spans(n_spans: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Deal span indices to train/val/test from a seeded permutation; each split keeps corpus order."""
    n_val = max(1, round(n_spans * val_fraction))
    n_test = max(1, round(n_spans * test_fraction))
    if n_val + n_test >= n_spans:
        raise DataError(
            f"the corpus has only {n_spans} span(s) of text, too few for train, validation and "
            "test splits; lower data.span_chars or use a larger corpus"
        )
    order = np.random.default_rng(seed).permutation(n_spans).tolist()
    held_out = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {split: sorted(held_out[split]) for split in SPLITS}
