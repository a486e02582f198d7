"""Bad input fails fast with one line naming the problem and the config key, and leaves no cache debris."""

import time

import pytest

from lego.data import DataConfig, TokenizerConfig, prepare_data
from lego.data.tokens import TokenFileWriter
from lego.errors import DataError


def fails(data, tokenizer, cache_dir, match):
    """Run prepare_data, expect a one-line DataError matching `match`, and check the cache is clean."""
    with pytest.raises(DataError, match=match) as error:
        prepare_data(data, tokenizer, cache_dir=cache_dir, progress=False)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert not list(cache_dir.rglob("*.tmp"))
    return message


def test_missing_file(tmp_path, make_data, byte_tok):
    fails(make_data([tmp_path / "nope.txt"]), byte_tok, tmp_path, r"data\.files.*nope\.txt")


def test_empty_file(tmp_path, make_data, byte_tok):
    (tmp_path / "empty.txt").write_text("")
    fails(make_data([tmp_path / "empty.txt"]), byte_tok, tmp_path, r"empty.*data\.files")


def test_blank_file(tmp_path, make_data, byte_tok):
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    fails(make_data([tmp_path / "blank.txt"]), byte_tok, tmp_path, r"no text.*data\.files")


def test_corpus_smaller_than_a_sequence(tmp_path, small_txt, make_data, byte_tok):
    fails(make_data([small_txt], seq_len=10_000), byte_tok, tmp_path, r"fewer than one sequence.*data\.seq_len")


def test_corpus_too_small_to_split(tmp_path, make_data, byte_tok):
    (tmp_path / "tiny.txt").write_text("just one short line\n")
    fails(make_data([tmp_path / "tiny.txt"]), byte_tok, tmp_path, r"data\.span_chars")


def test_wrong_text_column(tmp_path, make_data, byte_tok):
    (tmp_path / "rows.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    message = fails(make_data([tmp_path / "rows.jsonl"]), byte_tok, tmp_path, r"data\.text_column")
    assert "body" in message  # the available columns are listed


def test_non_text_column(tmp_path, make_data, byte_tok):
    (tmp_path / "rows.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    fails(make_data([tmp_path / "rows.jsonl"]), byte_tok, tmp_path, r"not text.*data\.text_column")


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_file(tmp_path, make_data, byte_tok, name):
    content = "caf\u00e9 au lait\n" if name.endswith(".txt") else '{"text": "caf\u00e9"}\n'
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    message = fails(make_data([tmp_path / name]), byte_tok, tmp_path, r"not valid UTF-8.*data\.files")
    if name.endswith(".txt"):  # the text reader fails on the file itself, so the file can be named
        assert name in message


def test_unknown_extension(tmp_path, make_data, byte_tok):
    (tmp_path / "notes.docx").write_text("hello")
    fails(make_data([tmp_path / "notes.docx"]), byte_tok, tmp_path, r"data\.format")


def test_mixed_formats(tmp_path, make_data, byte_tok):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "hello"}\n')
    fails(make_data([tmp_path / "a.txt", tmp_path / "b.jsonl"]), byte_tok, tmp_path, r"mixes formats")


def test_wrong_format(tmp_path, make_data, byte_tok):
    (tmp_path / "a.txt").write_text("hello")
    fails(make_data([tmp_path / "a.txt"], format="parquet"), byte_tok, tmp_path, r"parquet.*data\.format")


def test_hub_dataset_offline(tmp_path, byte_tok):
    """The hf path is real; offline it must fail at once with a message saying what could not be reached."""
    data = DataConfig(source="hf", name="wikitext", config_name="wikitext-2-raw-v1")
    start = time.perf_counter()
    message = fails(data, byte_tok, tmp_path, r"could not load hub dataset 'wikitext'.*data\.name")
    assert time.perf_counter() - start < 10
    assert "data=austen" in message


def test_missing_tokenizer_file(tmp_path, small_txt, make_data):
    tok = TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json"))
    fails(make_data([small_txt]), tok, tmp_path, r"tokenizer\.path")


def test_interrupted_run_leaves_no_cache_entry(tmp_path, small_txt, make_data, monkeypatch):
    """A crash while tokenizing must not leave token files that the next run would trust as complete."""
    real_add, calls = TokenFileWriter.add, []

    def add_then_crash(writer, items):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_add(writer, items)

    monkeypatch.setattr(TokenFileWriter, "add", add_then_crash)
    data = make_data([small_txt], span_chars=200)  # many spans, so the crash is in the middle
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data, TokenizerConfig(vocab_size=300), cache_dir=tmp_path, progress=False)
    assert [p.parent.name for p in tmp_path.glob("tokenizers/*")] == ["tokenizers"]  # complete, so kept
    assert [p.suffix for p in (tmp_path / "tokens").iterdir() if p.is_dir()] == [".partial"]  # resumable, not done
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("content", "match"), [(b'{"text": "caf\xe9"}\n', "not valid UTF-8"), (b'{"text": 1,\n', "could not read")]
)
def test_a_stream_read_error_is_one_line(tmp_path, make_data, byte_tok, content, match):
    """A stream reads its files only when iterated: a bad file is still one line naming data.files."""
    (tmp_path / "rows.jsonl").write_bytes(content)
    fails(make_data([tmp_path / "rows.jsonl"], streaming=True), byte_tok, tmp_path, rf"{match}.*data\.files")
