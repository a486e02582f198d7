"""Tokenizers: exact round trips, byte ids, save/load, and clean errors for bad tokenizer files."""

import pytest
from tokenizers import pre_tokenizers

from lego.data.tokenizer import Tokenizer, _byte_alphabet, byte_tokenizer, train_bpe
from lego.errors import DataError

TRICKY = "Plain words,  double  spaces\tand tabs\n\nnew lines, café, naïve, 東京, emoji 🙂 and \x00 NUL."


def test_byte_alphabet_is_bytelevels():
    assert set(_byte_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_bytes_tokenizer_ids_are_utf8_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 256
    assert tok.encode(TRICKY) == list(TRICKY.encode("utf-8"))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_bpe_round_trip_and_compression(numbered_lines):
    text = numbered_lines(200)
    tok = train_bpe([text], vocab_size=400, progress=False)
    assert 256 < tok.vocab_size <= 400
    assert tok.decode(tok.encode(TRICKY)) == TRICKY  # unseen characters fall back to bytes
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_save_and_load(tmp_path, numbered_lines):
    tok = train_bpe([numbered_lines(50)], vocab_size=300, progress=False)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.encode(TRICKY) == tok.encode(TRICKY)
    assert loaded.fingerprint == tok.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer.path"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_malformed_tokenizer_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="tokenizer.path") as error:
        Tokenizer.from_file(tmp_path / "bad.json")
    assert "\n" not in str(error.value)
