"""Train/validation/test split by contiguous spans of text, never by individual tokens.

Documents are cut into spans of about `span_chars` characters (at line breaks where possible), and
short consecutive documents are packed into one span, so corpora with a few long documents (Austen's six
novels) and corpora with many short rows (wikitext lines, jsonl records) are both split into units of
similar size. Whole spans are then dealt to the splits by a seeded permutation: held-out text is
contiguous and never appears in training, and the same seed always gives the same split.
"""

from collections.abc import Iterable

import numpy as np

from lego.errors import DataError

SPLITS = ("train", "val", "test")


def make_spans(documents: Iterable[str | None], span_chars: int) -> list[str]:
    """Cut long documents and pack short ones into spans of roughly `span_chars` characters, in order.

    Each document is made to end with a newline, so that spans concatenate into readable text.
    """
    spans: list[str] = []
    packed = ""  # consecutive short documents waiting to fill a span
    for doc in documents:
        doc = doc or ""
        if not doc.endswith("\n"):
            doc += "\n"
        if len(doc) < span_chars:
            packed += doc
            if len(packed) >= span_chars:
                spans.append(packed)
                packed = ""
            continue
        if packed:
            spans.append(packed)
            packed = ""
        spans.extend(_cut(doc, span_chars))
    if packed:
        spans.append(packed)
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
