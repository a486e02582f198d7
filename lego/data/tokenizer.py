"""Tokenizers, all backed by HF `tokenizers` so they share one fast encoder and one file format.

- `bpe`: a byte-level BPE trained on the training split only (held-out text must not shape the vocab).
- `bytes`: the same byte-level model with no merges, so token id == UTF-8 byte value (vocab 256).
- `file`: any `tokenizer.json` saved by `tokenizers` (e.g. a `bpe` tokenizer from an earlier run).
None of them needs the network.
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lego.atomic import atomic_write
from lego.errors import DataError


class Tokenizer:
    """A thin wrapper giving the runner plain encode/decode on lists of ints, without special tokens."""

    def __init__(self, hf: HFTokenizer, kind: str) -> None:
        self.hf = hf
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """Hash of the full serialised tokenizer: token caches are keyed by it."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses all cores); without the character offsets where the
        library can skip them (`encode_batch_fast`, tokenizers >= 0.20: the same ids, about 1.5x the speed)."""
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (loadable with tokenizer.kind=file), atomically."""
        atomic_write(Path(path), lambda tmp: self.hf.save(str(tmp)))

    @classmethod
    def from_file(cls, path: str | Path, kind: str = "file") -> "Tokenizer":
        if not Path(path).is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist; check tokenizer.path")
        try:
            return cls(HFTokenizer.from_file(str(path)), kind)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            first_line = (str(e).splitlines() or [""])[0][:200]
            raise DataError(
                f"{str(path)!r} is not a tokenizers tokenizer.json ({first_line}); check tokenizer.path"
            ) from e


def byte_tokenizer() -> Tokenizer:
    """Byte-level model with no merges; ids are the raw UTF-8 byte values."""
    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf, "bytes")


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = True) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE: every byte is in the vocab, so any text round-trips exactly."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=progress,
    )
    hf.train_from_iterator((t for t in texts if t), trainer=trainer)
    return Tokenizer(hf, "bpe")


def _byte_alphabet() -> list[str]:
    """The printable character ByteLevel uses for each byte value, indexed by byte (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted past 255,
    in byte order, so every byte has a visible, distinct stand-in.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]
