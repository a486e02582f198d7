"""Token files: each split is one flat array of token ids on disk (nanoGPT's `train.bin` layout: uint16 where the
vocabulary fits, else uint32, native byte order, no header), read through `np.memmap`.

`TokenWindows` cuts such an array into training windows without copying it: a window is an offset into the file,
the OS pages in what a batch touches, and the only int64 copy is the batch. `TokenFileWriter` writes the arrays a
shard at a time and can resume a killed preparation from its last finished shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lego.atomic import atomic_write, remove_stale_temporaries
from lego.data.splits import SPLITS
from lego.errors import DataError
from lego.memory import release_freed_memory

SHARD_TOKENS = 1 << 24  # tokens per finished shard: what a killed preparation loses at most (32 MB of uint16)
_SCAN_TOKENS = 1 << 22  # tokens read at a time when a file is checked


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: 2 bytes per token up to 65,536 tokens, else 4."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def map_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    """A token file as a flat array, memory-mapped copy-on-write (the file itself is never changed)."""
    if os.path.getsize(path) == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c")


def check_token_file(path: Path, dtype: np.dtype, vocab_size: int, key: str) -> None:
    """A DataError naming `key` unless `path` is a whole number of `dtype` ids, all below `vocab_size`. Read in
    chunks, not mapped, so checking a file leaves none of it resident."""
    if not path.is_file():
        raise DataError(f"{key}: {str(path)!r} does not exist; check the path")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{key}: {str(path)!r} has {size} bytes, not a whole number of {dtype.name} ids; check data.token_dtype"
        )
    top = -1
    with open(path, "rb") as f:
        while (chunk := np.fromfile(f, dtype=dtype, count=_SCAN_TOKENS)).size:
            top = max(top, int(chunk.max()))
    if top >= vocab_size:
        raise DataError(
            f"{key}: {str(path)!r} holds token id {top}, outside the tokenizer's vocabulary of {vocab_size}; give "
            "the tokenizer the files were made with (tokenizer.path) or check data.token_dtype"
        )


class TokenWindows:
    """(windows, seq_len + 1) token windows laid end to end over a flat token array, usually a memory-mapped token
    file; inputs are w[:, :-1], targets w[:, 1:].

    Nothing is copied until asked for: indexing (`windows[rows]`, `windows[:, 1:]`) and `split` give int64 tensors,
    and `stored` is the windows as the file holds them (uint16 or uint32), a view of it that
    `TrainingData.from_windows` keeps as it is."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        width = seq_len + 1
        n = len(tokens) // width
        self.stored = torch.from_numpy(tokens[: n * width].reshape(n, width))

    @property
    def shape(self) -> torch.Size:
        return self.stored.shape

    def __len__(self) -> int:
        return len(self.stored)

    def numel(self) -> int:
        return self.stored.numel()

    def __getitem__(self, index) -> Tensor:
        return self.stored[index].long()

    def split(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive batches of `batch_size` windows (the last may be smaller), int64, one at a time."""
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]


class TokenFileWriter:
    """Appends token ids to one file per split in `folder`, resumably:

        with TokenFileWriter(folder, dtype, plan) as writer:
            for span in spans[writer.position:]:        # inputs already in the files are skipped
                writer.add([(split, ids, chars), ...])   # one entry per input, in order
        # the files and writer.manifest are complete once the block ends

    `plan()` (called for a new folder only) gives what the manifest records besides the progress, e.g. the number
    of inputs.
    Tokens are buffered and written a shard at a time (SHARD_TOKENS or more over all splits): the files are synced
    before `manifest.json` (replaced atomically) counts them, so after a kill the manifest names the last finished
    shard, and reopening the folder cuts each file back to it and resumes after its last input."""

    def __init__(self, folder: Path, dtype: np.dtype, plan: Callable[[], dict]) -> None:
        self.folder = folder
        self.path = folder / "manifest.json"
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)  # a manifest write that a kill interrupted
        if self.path.is_file():
            self.manifest = json.loads(self.path.read_text())
        else:
            empty = dict.fromkeys(SPLITS, 0)
            self.manifest = {**plan(), "dtype": dtype.name, "position": 0, "tokens": empty, "chars": dict(empty)}
            self._write_manifest()
        self.dtype = np.dtype(self.manifest["dtype"])
        self.files = {split: open(folder / f"{split}.bin", "ab") for split in SPLITS}  # noqa: SIM115
        for split, file in self.files.items():
            file.truncate(self.manifest["tokens"][split] * self.dtype.itemsize)  # bytes past the last shard
        self.resumed = self.manifest["position"] > 0
        self._pending: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        self._pending_inputs = self._pending_tokens = 0

    @property
    def position(self) -> int:
        """How many inputs the finished shards hold: where the input resumes."""
        return self.manifest["position"]

    def add(self, items: list[tuple[str, list[int], int]]) -> None:
        """The next inputs, in order: (split, token ids, characters) each; a shard is written when one is full."""
        for split, ids, chars in items:
            self._pending[split].append(np.asarray(ids, dtype=self.dtype))
            self._pending_tokens += len(ids)
            self.manifest["chars"][split] += chars
        self._pending_inputs += len(items)
        if self._pending_tokens >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as one finished shard."""
        for split, file in self.files.items():
            for ids in self._pending[split]:
                file.write(ids.tobytes())
                self.manifest["tokens"][split] += len(ids)
            self._pending[split].clear()
            file.flush()
            os.fsync(file.fileno())
        self.manifest["position"] += self._pending_inputs
        self._pending_inputs = self._pending_tokens = 0
        self._write_manifest()
        release_freed_memory()  # the shard's buffers and the encoder's per-token temporaries, freed but kept

    def _write_manifest(self) -> None:
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)))

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, error_type, *exc) -> None:
        if error_type is None:
            self.flush()  # the last, partial shard
        for file in self.files.values():
            file.close()


def read_token_files(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The split arrays a TokenFileWriter left in `folder`, memory-mapped, and its manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    return {split: map_tokens(folder / f"{split}.bin", dtype) for split in SPLITS}, manifest
