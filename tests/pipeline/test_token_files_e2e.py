"""`data=token_files`: train.py trains on already-tokenized flat files (nanoGPT's train.bin/val.bin, uint16) with the
tokenizer they were made with, without tokenizing anything."""

import json

import numpy as np

from lego.data.tokenizer import byte_tokenizer
from tests.launch import run_train


def test_train_on_nanogpt_token_files(tmp_path, cache_dir):
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    text = "".join(f"line {i:05d}: the quick brown fox jumps over the lazy dog\n" for i in range(2000))
    ids = np.asarray(tok.encode(text), dtype=np.uint16)  # 112,000 tokens
    ids[:100_000].tofile(tmp_path / "train.bin")
    ids[100_000:].tofile(tmp_path / "val.bin")
    run_dir = tmp_path / "run"
    proc = run_train(
        "+experiment=tiny", f"hydra.run.dir={run_dir}", "wandb=disabled", "data=token_files",
        f"data.token_files.train={tmp_path / 'train.bin'}", f"data.token_files.val={tmp_path / 'val.bin'}",
        "tokenizer=file", f"tokenizer.path={tmp_path / 'tokenizer.json'}", "data.max_train_tokens=4000",
        cache_dir=cache_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: token_files, train " in proc.stdout and "test the second half of val" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["source"] == "token_files" and results["data"]["vocab_size"] == 256
    # the caps of tiny (4,000 training tokens here, 4,000 for val and test) in whole windows of 33
    assert results["data"]["tokens"] == {"train": 121 * 33, "val": 121 * 33, "test": 121 * 33}
    assert results["test_tokens"] == 121 * 32 and results["test_ppl"] < results["unigram_ppl"]
