"""prepare_data end to end: the default corpus, local files, splits, determinism and caching."""

import json
import os
import re

import datasets
import pytest
import torch

import lego.data.prepare as prepare_module
from lego.data import DataConfig, TokenizerConfig, format_summary, prepare_data


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
    """The default config, cold, exactly as a fresh install would run it (offline)."""
    return prepare_data(DataConfig(), TokenizerConfig(), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_default_corpus(austen):
    assert austen.vocab_size == 4096 == austen.tokenizer.vocab_size
    for split in ("train", "val", "test"):
        windows = getattr(austen, split)
        assert windows.stored.dtype == torch.uint16 and windows.shape[1] == 129  # the token file, as it is
        assert windows[:2].dtype == torch.int64  # a batch
        assert windows[:].min() >= 0 and windows[:].max() < 4096
    summary = austen.summary
    assert summary["documents"] == 6
    assert summary["tokens"]["train"] > 15 * summary["tokens"]["val"] > 0
    assert summary["tokenized"] == "fresh" and not summary["tokenizer_cached"]
    assert "6 documents" in format_summary(summary)
    assert 100 < austen.unigram_ppl() < 4096


def test_round_trip_on_held_out_text(austen):
    text = austen.tokenizer.decode(austen.test[0].tolist())
    assert austen.tokenizer.decode(austen.tokenizer.encode(text)) == text
    assert "Emma" in austen.tokenizer.decode(austen.train[:200].flatten().tolist())


def test_batches(austen):
    inputs, targets = next(austen.batches("train", 4, shuffle=True, seed=1))
    assert inputs.shape == targets.shape == (4, 128)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    sizes = [len(x) for x, _ in austen.batches("val", 100)]
    assert sum(sizes) == len(austen.val) and max(sizes) == 100


def test_splits_are_disjoint_and_tokenizer_sees_train_only(tmp_path, small_txt, make_data, monkeypatch):
    trained_on = []
    real_train_bpe = prepare_module.train_bpe

    def spy(texts, *args, **kwargs):
        trained_on.extend(texts)
        return real_train_bpe(trained_on, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "train_bpe", spy)
    data = make_data([small_txt], val_fraction=0.1, test_fraction=0.1)
    prepared = prepare_data(data, TokenizerConfig(vocab_size=300), cache_dir=tmp_path, progress=False)

    def line_numbers(text):  # whole lines only: a window boundary may cut the last line of a split
        return {line[:10] for line in text.splitlines() if re.fullmatch(r"line \d{5}: .* dog", line)}

    train, val, test = (
        line_numbers(prepared.tokenizer.decode(getattr(prepared, s)[:].flatten().tolist()))
        for s in ("train", "val", "test")
    )
    assert train and val and test
    assert not train & val and not train & test and not val & test
    tokenizer_lines = line_numbers("".join(trained_on))
    assert tokenizer_lines >= train and not tokenizer_lines & (val | test)


def test_deterministic_across_cache_dirs(tmp_path, small_txt, make_data, byte_tok):
    runs = [
        prepare_data(make_data([small_txt], split_seed=seed), byte_tok, cache_dir=tmp_path / str(i), progress=False)
        for i, seed in enumerate((7, 7, 8))
    ]
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(runs[0], split)[:], getattr(runs[1], split)[:])
    assert not torch.equal(runs[0].val[:], runs[2].val[:])


def test_cache_reuse(tmp_path, small_txt, make_data, monkeypatch):
    calls = []
    real_train_bpe = prepare_module.train_bpe
    monkeypatch.setattr(prepare_module, "train_bpe", lambda *a, **k: calls.append(1) or real_train_bpe(*a, **k))
    real_write = prepare_module._write_tokens
    monkeypatch.setattr(prepare_module, "_write_tokens", lambda *a, **k: calls.append(2) or real_write(*a, **k))
    tok = TokenizerConfig(vocab_size=300)

    cold = prepare_data(make_data([small_txt]), tok, cache_dir=tmp_path, progress=False)
    assert calls == [1, 2]
    cached = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".json", ".bin") and "datasets" not in p.parts)
    assert [p.parent.name for p in cached[:1]] == ["tokenizers"]
    assert [(p.parent.parent.name, p.name) for p in cached[1:]] == [
        ("tokens", name) for name in ("manifest.json", "test.bin", "train.bin", "val.bin")
    ]  # one folder of token files
    mtimes = [p.stat().st_mtime_ns for p in cached]

    warm = prepare_data(make_data([small_txt], seq_len=8), tok, cache_dir=tmp_path, progress=False)
    assert calls == [1, 2]  # neither retrained nor re-tokenized, although seq_len changed
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert warm.summary["tokenizer_cached"] and warm.summary["tokenized"] == "cached"
    assert torch.equal(warm.train[:].flatten()[:1000], cold.train[:].flatten()[:1000])
    assert not list(tmp_path.rglob("*.tmp"))


def test_caps(tmp_path, small_txt, make_data, byte_tok):
    data = make_data([small_txt], max_train_tokens=170, max_eval_tokens=40)
    prepared = prepare_data(data, byte_tok, cache_dir=tmp_path, progress=False)
    assert prepared.train.shape == (10, 17) and prepared.val.shape == prepared.test.shape == (2, 17)


def test_text_file_is_one_document(tmp_path, make_data, byte_tok, numbered_lines):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(numbered_lines(100), encoding="utf-8")
    prepared = prepare_data(make_data([tmp_path / "doc*.txt"]), byte_tok, cache_dir=tmp_path / "c", progress=False)
    assert prepared.summary["documents"] == 3
    assert sum(prepared.summary["chars"].values()) == 3 * len(numbered_lines(100))


def test_jsonl_with_custom_column(tmp_path, make_data, byte_tok, numbered_lines):
    rows = [{"id": i, "body": numbered_lines(20)} for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = make_data([tmp_path / "rows.jsonl"], text_column="body")
    prepared = prepare_data(data, byte_tok, cache_dir=tmp_path / "c", progress=False)
    assert prepared.summary["documents"] == 20
    assert "line 00007" in prepared.tokenizer.decode(prepared.train[:].flatten().tolist())


def test_parquet(tmp_path, make_data, byte_tok, numbered_lines):
    datasets.Dataset.from_dict({"text": [numbered_lines(20)] * 20}).to_parquet(str(tmp_path / "rows.parquet"))
    prepared = prepare_data(make_data([tmp_path / "rows.parquet"]), byte_tok, cache_dir=tmp_path / "c", progress=False)
    assert prepared.summary["documents"] == 20


def test_tokenizer_from_file(tmp_path, small_txt, make_data, austen):
    austen.tokenizer.save(tmp_path / "tokenizer.json")
    tok = TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json"))
    prepared = prepare_data(make_data([small_txt]), tok, cache_dir=tmp_path / "c", progress=False)
    assert prepared.vocab_size == 4096
    assert os.listdir(tmp_path / "c" / "tokens")
