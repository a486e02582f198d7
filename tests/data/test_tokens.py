"""Token files: windows are views of memory-mapped flat arrays (int64 only per batch), a killed preparation resumes
from its last finished shard to the identical files, BPE trains on a bounded sample, a streamed dataset gives the
same splits as a loaded one, and already-tokenized files (nanoGPT's train.bin/val.bin) are used as they are."""

import json

import datasets
import numpy as np
import pytest
import torch

import lego.data.tokens as tokens_module
from lego import TrainingData
from lego.data import DataConfig, TokenizerConfig, TokenWindows, prepare_data
from lego.data.splits import assign_spans, make_spans
from lego.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from lego.data.tokens import TokenFileWriter, map_tokens, token_dtype
from lego.errors import ConfigError, DataError


def token_file(path, ids, dtype=np.uint16):
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


def token_bytes(prepared) -> dict[str, bytes]:
    return {split: getattr(prepared, split).stored.numpy().tobytes() for split in ("train", "val", "test")}


def test_windows_are_views_of_the_file_and_batches_are_int64(tmp_path):
    flat = map_tokens(token_file(tmp_path / "t.bin", np.arange(50) % 7), np.dtype(np.uint16))
    windows = TokenWindows(flat, seq_len=4)  # 10 windows of 5; nothing left over
    assert windows.shape == (10, 5) and len(windows) == 10 and windows.numel() == 50
    assert windows.stored.dtype == torch.uint16 and windows.stored.data_ptr() == flat.ctypes.data  # no copy
    rows = torch.tensor([3, 0])
    assert windows[rows].dtype == torch.int64 and windows[rows].tolist() == [[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]
    batches = list(windows.split(4))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat(batches), torch.from_numpy(np.arange(50) % 7).view(10, 5))

    data = TrainingData.from_windows(windows)
    assert data.input_ids.data_ptr() == flat.ctypes.data and data.active.stride() == (0, 0)  # views, no memory
    assert len(data) == 40 and data.input_ids.dtype == torch.uint16
    batch = next(data.batches(3))
    assert batch.input_ids.dtype == batch.targets.dtype == torch.int64
    assert torch.equal(batch.targets, windows[:3][:, 1:])
    shard = data.shard(1, 3)
    assert shard.input_ids.data_ptr() == flat.ctypes.data + 5 * 2  # a view starting at window 1
    assert torch.equal(shard.select(torch.arange(3)).input_ids, windows[torch.tensor([1, 4, 7])][:, :-1])


def test_uint32_holds_a_large_vocabulary(tmp_path):
    assert token_dtype(1 << 16) == np.uint16 and token_dtype((1 << 16) + 1) == np.uint32
    ids = [0, 70_000, 1 << 20, 5]
    with TokenFileWriter(tmp_path / "f", np.dtype(np.uint32), lambda: {"span_count": 1}) as writer:
        writer.add([("train", ids, 9)])
    windows = TokenWindows(map_tokens(tmp_path / "f" / "train.bin", np.dtype(np.uint32)), seq_len=3)
    assert windows[0].tolist() == ids
    assert TrainingData.from_windows(windows).select(torch.tensor([0])).input_ids.tolist() == [ids[:3]]


def test_a_killed_preparation_resumes_from_its_last_shard(tmp_path, small_txt, make_data, byte_tok, monkeypatch):
    data = make_data([small_txt], span_chars=500)
    whole = prepare_data(data, byte_tok, cache_dir=tmp_path / "whole", progress=False)
    spans = sum(whole.summary["spans"].values())

    monkeypatch.setattr(tokens_module, "SHARD_TOKENS", 5000)  # a shard after each batch of spans
    real_flush = TokenFileWriter.flush

    def flush_once_then_die(writer):
        real_flush(writer)
        if writer.position:  # the first shard is on disk: die as a kill would, before anything else is written
            writer.files["train"].write(b"\x07" * 11)  # bytes past the shard, which a resume must cut off
            writer.files["train"].flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(TokenFileWriter, "flush", flush_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data, byte_tok, cache_dir=tmp_path / "c", progress=False)
    (partial,) = (tmp_path / "c" / "tokens").glob("*.partial")
    done = json.loads((partial / "manifest.json").read_text())["position"]
    assert 0 < done < spans

    monkeypatch.setattr(TokenFileWriter, "flush", real_flush)
    encoded = []
    real_encode = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda tok, texts: encoded.extend(texts) or real_encode(tok, texts))
    resumed = prepare_data(data, byte_tok, cache_dir=tmp_path / "c", progress=False)
    assert resumed.summary["tokenized"] == "resumed" and len(encoded) == spans - done  # only the spans left
    assert token_bytes(resumed) == token_bytes(whole)
    assert resumed.summary["chars"] == whole.summary["chars"]
    assert not list((tmp_path / "c" / "tokens").glob("*.partial"))


def test_bpe_trains_on_the_first_chars_of_the_train_split(tmp_path, small_txt, make_data, monkeypatch):
    data = make_data([small_txt], span_chars=500)
    spans = make_spans([small_txt.read_text()], 500)
    train_text = "".join(spans[i] for i in assign_spans(len(spans), 0.05, 0.05, 0)["train"])
    seen = []
    real_train_bpe = train_bpe

    def spy(texts, *args, **kwargs):
        seen.append("".join(texts))
        return real_train_bpe([seen[-1]], *args, **kwargs)

    monkeypatch.setattr("lego.data.prepare.train_bpe", spy)
    prepare_data(data, TokenizerConfig(vocab_size=300, max_train_chars=1234), cache_dir=tmp_path / "a", progress=False)
    assert seen[-1] == train_text[:1234]

    monkeypatch.undo()  # a sample larger than the train split: the tokenizer trained on all of it, as before
    big = prepare_data(data, TokenizerConfig(vocab_size=300), cache_dir=tmp_path / "b", progress=False)
    spans_alone = [spans[i] for i in assign_spans(len(spans), 0.05, 0.05, 0)["train"]]
    assert big.tokenizer.fingerprint == train_bpe(spans_alone, 300, progress=False).fingerprint


def write_rows(path, rows):
    """`rows` as JSON lines (.json) or parquet (.parquet), by the file's suffix."""
    if path.suffix == ".json":
        datasets.Dataset.from_list(rows).to_json(str(path))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_a_streamed_dataset_gives_the_loaded_splits(tmp_path, byte_tok, numbered_lines, builder):
    rows = [{"text": f"row {i}\n" + numbered_lines(20)} for i in range(40)]
    path = write_rows(tmp_path / f"rows.{builder}", rows)
    hub = {"source": "hf", "name": builder, "files": [str(path)], "seq_len": 16, "span_chars": 2000}
    streamed = prepare_data(DataConfig(**hub, streaming=True), byte_tok, cache_dir=tmp_path / "s", progress=False)
    loaded = prepare_data(DataConfig(**hub), byte_tok, cache_dir=tmp_path / "l", progress=False)
    assert token_bytes(streamed) == token_bytes(loaded) and streamed.summary["spans"] == loaded.summary["spans"]
    assert not list((tmp_path / "s" / "datasets").rglob("*.arrow"))  # no Arrow copy of a stream
    assert list((tmp_path / "l" / "datasets").rglob("*.arrow"))

    again = prepare_data(DataConfig(**hub, streaming=True), byte_tok, cache_dir=tmp_path / "s", progress=False)
    assert again.summary["tokenized"] == "cached"
    write_rows(path, [*rows, {"text": "one more row\n"}])
    changed = prepare_data(DataConfig(**hub, streaming=True), byte_tok, cache_dir=tmp_path / "s", progress=False)
    assert changed.summary["tokenized"] == "fresh" and changed.summary["fingerprint"] != again.summary["fingerprint"]


def test_a_streamed_text_file_is_one_document(tmp_path, small_txt, make_data, byte_tok):
    streamed = prepare_data(make_data([small_txt], streaming=True), byte_tok, cache_dir=tmp_path / "s", progress=False)
    loaded = prepare_data(make_data([small_txt]), byte_tok, cache_dir=tmp_path / "l", progress=False)
    assert token_bytes(streamed) == token_bytes(loaded) and streamed.summary["documents"] == 1


@pytest.fixture
def nanogpt_files(tmp_path):
    """nanoGPT's layout: train.bin and val.bin, uint16 ids of a tokenizer saved next to them."""
    generator = np.random.default_rng(0)
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    return {
        "train": token_file(tmp_path / "train.bin", generator.integers(0, 256, 1000)),
        "val": token_file(tmp_path / "val.bin", generator.integers(0, 256, 200)),
        "tokenizer": tmp_path / "tokenizer.json",
    }


def token_files_config(files, **overrides):
    paths = {"train": str(files["train"]), "val": str(files["val"]), "test": None} | overrides.pop("paths", {})
    return DataConfig(source="token_files", token_files=paths, seq_len=9, **overrides)


def test_token_files_are_used_as_they_are(tmp_path, nanogpt_files):
    tok = TokenizerConfig(kind="file", path=str(nanogpt_files["tokenizer"]))
    prepared = prepare_data(token_files_config(nanogpt_files), tok, cache_dir=tmp_path / "c", progress=False)
    train, val = (np.fromfile(nanogpt_files[s], dtype=np.uint16).astype(np.int64) for s in ("train", "val"))
    assert torch.equal(prepared.train[:].flatten(), torch.from_numpy(train))  # 100 windows of 10, all of it
    assert torch.equal(prepared.val[:].flatten(), torch.from_numpy(val[:100]))  # val's first half...
    assert torch.equal(prepared.test[:].flatten(), torch.from_numpy(val[100:]))  # ...and its second, the test split
    assert prepared.vocab_size == 256 and not (tmp_path / "c").exists()  # nothing prepared, nothing cached
    with_test = token_files_config(nanogpt_files, paths={"test": str(nanogpt_files["train"])}, max_eval_tokens=30)
    prepared = prepare_data(with_test, tok, cache_dir=tmp_path / "c", progress=False)
    assert torch.equal(prepared.test[:].flatten(), torch.from_numpy(train[:30]))
    assert prepared.val.shape == (3, 10)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"tokenizer": TokenizerConfig()}, ConfigError, r"tokenizer=file tokenizer\.path"),
        ({"paths": {"val": None}}, ConfigError, r"data\.token_files\.val is not set"),
        ({"paths": {"valid": "x.bin"}}, ConfigError, r"data\.token_files\.valid is not a split"),
        ({"paths": {"train": "/nope/train.bin"}}, DataError, r"data\.token_files\.train.*does not exist"),
        ({"odd": True}, DataError, r"not a whole number of uint16 ids.*data\.token_dtype"),
        ({"large_id": True}, DataError, r"token id 300, outside the tokenizer's vocabulary of 256.*tokenizer\.path"),
    ],
)
def test_bad_token_files(tmp_path, nanogpt_files, change, error, match):
    tok = change.get("tokenizer", TokenizerConfig(kind="file", path=str(nanogpt_files["tokenizer"])))
    if change.get("odd"):
        nanogpt_files["train"].write_bytes(nanogpt_files["train"].read_bytes() + b"\x01")
    if change.get("large_id"):
        token_file(nanogpt_files["val"], [1, 2, 300, 4])
    data = token_files_config(nanogpt_files, paths=change.get("paths", {}))
    with pytest.raises(error, match=match) as raised:
        prepare_data(data, tok, cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(raised.value)
