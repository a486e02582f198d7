"""Span cutting and split assignment: contiguous, complete, disjoint and seeded."""

import pytest

from lego.data.splits import assign_spans, count_spans, make_spans, span_labels
from lego.errors import DataError


def test_spans_keep_all_text_in_order(numbered_lines):
    docs = [numbered_lines(300), "short one", "", "short two\n", numbered_lines(50)]
    spans = make_spans(docs, span_chars=1000)
    assert "".join(spans) == "".join(d if d.endswith("\n") else d + "\n" for d in docs)
    assert all(len(s) <= 1000 for s in spans)
    assert all(s.endswith("\n") for s in spans)  # long documents are cut at line breaks


def test_counting_a_stream_matches_its_spans(numbered_lines):
    docs = [numbered_lines(300), "short one", "", " \n", None, numbered_lines(50)]
    assert count_spans(iter(docs), span_chars=1000) == (3, len(make_spans(docs, span_chars=1000)))


def test_short_documents_are_packed():
    spans = make_spans([f"row {i}" for i in range(100)], span_chars=50)
    assert 10 <= len(spans) < 30
    assert spans[0].startswith("row 0\nrow 1\n")


def test_empty_documents_give_no_spans():
    assert make_spans(["", None, "  \n"], span_chars=100) == []


def test_assignment_is_a_disjoint_cover():
    splits = assign_spans(200, 0.05, 0.1, seed=0)
    assert (len(splits["val"]), len(splits["test"])) == (10, 20)
    everything = splits["train"] + splits["val"] + splits["test"]
    assert sorted(everything) == list(range(200))
    assert all(splits[s] == sorted(splits[s]) for s in splits)


def test_labels_are_the_assignment():
    labels = span_labels(200, 0.05, 0.1, seed=0)
    splits = assign_spans(200, 0.05, 0.1, seed=0)
    assert [i for i, label in enumerate(labels) if label == 2] == splits["test"]
    assert [i for i, label in enumerate(labels) if label == 1] == splits["val"]


def test_assignment_is_seeded():
    assert assign_spans(100, 0.1, 0.1, seed=3) == assign_spans(100, 0.1, 0.1, seed=3)
    assert assign_spans(100, 0.1, 0.1, seed=3) != assign_spans(100, 0.1, 0.1, seed=4)


def test_too_few_spans():
    with pytest.raises(DataError, match="data.span_chars"):
        assign_spans(2, 0.05, 0.05, seed=0)
