"""Config schemas for the `data` and `tokenizer` groups.

Plain dataclasses so that the data code stays free of Hydra: the runner registers them in Hydra's
ConfigStore, and `validate()` turns out-of-range values into a one-line `ConfigError` naming the key.
"""

from dataclasses import dataclass, field

from lego.data.splits import SPLITS
from lego.errors import ConfigError, check_one_of

SOURCES = ("austen", "text_files", "hf", "token_files")
FORMATS = ("auto", "text", "json", "parquet")
TOKENIZER_KINDS = ("bpe", "bytes", "file")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class DataConfig:
    source: str = "austen"  # "austen" (embedded, default) | "text_files" | "hf" | "token_files"
    files: list[str] = field(default_factory=list)  # text_files: paths or globs; hf: its data_files (optional)
    format: str = "auto"  # text_files: "auto" (by extension) | "text" | "json" | "parquet"
    name: str | None = None  # hf: dataset name on the hub, e.g. "wikitext", or a builder ("json") for data.files
    config_name: str | None = None  # hf: dataset config, e.g. "wikitext-2-raw-v1"
    split: str = "train"  # hf: split to read; our train/val/test are carved out of it
    streaming: bool = False  # read the corpus as a stream, tokenized as it is read (no Arrow copy of it on disk)
    # token_files: flat token files (nanoGPT's train.bin/val.bin); test is optional (then: val's second half)
    token_files: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(SPLITS))
    token_dtype: str = "uint16"  # token_files: "uint16" | "uint32", the files' element type
    text_column: str = "text"  # json/parquet/hf: column holding the text
    seq_len: int = 128  # tokens per input sequence (windows hold seq_len + 1)
    batch_size: int = 16
    max_train_tokens: int | None = None  # cap on training tokens (None: all)
    # cap on validation and on test tokens (their first ones; None: all): evaluation costs the same on any corpus
    max_eval_tokens: int | None = 1_000_000
    val_fraction: float = 0.05  # share of spans held out for early stopping / calibration
    test_fraction: float = 0.05  # share of spans held out for the final report only
    span_chars: int = 20000  # documents are cut into contiguous spans of about this many characters
    split_seed: int = 0  # deals spans to train/val/test; independent of the run's `seed` (model init, data order)

    def validate(self) -> None:
        """Reject values that cannot work before any file is read."""
        check_one_of("data.source", self.source, SOURCES)
        check_one_of("data.format", self.format, FORMATS)
        check_one_of("data.token_dtype", self.token_dtype, TOKEN_DTYPES)
        if self.source == "text_files" and not self.files:
            raise ConfigError("data.files is empty: pass the corpus files, e.g. data.files=[a.txt,b.jsonl]")
        if self.source == "hf" and not self.name:
            raise ConfigError("data.name is not set: name a hub dataset, e.g. data.name=wikitext")
        if self.source == "token_files":
            self._check_token_files()
        if not self.text_column:
            raise ConfigError("data.text_column is empty: name the column holding the text")
        for key, value in (("seq_len", self.seq_len), ("batch_size", self.batch_size), ("span_chars", self.span_chars)):
            if value < 1:
                raise ConfigError(f"data.{key}={value} must be a positive integer")
        for key, value in (("max_train_tokens", self.max_train_tokens), ("max_eval_tokens", self.max_eval_tokens)):
            if value is not None and value < self.seq_len + 1:
                raise ConfigError(
                    f"data.{key}={value} is less than one sequence (data.seq_len + 1 = "
                    f"{self.seq_len + 1} tokens); raise it or set it to null"
                )
        for key, value in (("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)):
            if not 0 < value < 1:
                raise ConfigError(f"data.{key}={value} must be strictly between 0 and 1")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction}"
                " leaves nothing to train on; make their sum less than 1"
            )

    def _check_token_files(self) -> None:
        unknown = sorted(set(self.token_files) - set(SPLITS))
        if unknown:
            raise ConfigError(f"data.token_files.{unknown[0]} is not a split; use train, val and test (optional)")
        for split in ("train", "val"):
            if not self.token_files.get(split):
                raise ConfigError(
                    f"data.token_files.{split} is not set: give the tokenized file, e.g. data.token_files.{split}="
                    f"{split}.bin"
                )


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (trained on the train split, cached) | "bytes" (vocab 256) | "file"
    vocab_size: int = 4096  # bpe only: target vocabulary size (at least the 256 bytes)
    path: str | None = None  # file: a tokenizer.json saved by HF `tokenizers`
    max_train_chars: int = 100_000_000  # bpe only: trained on the first this many characters of the train split

    def validate(self) -> None:
        """Reject values that cannot work before any file is read."""
        check_one_of("tokenizer.kind", self.kind, TOKENIZER_KINDS)
        if self.kind == "bpe" and self.vocab_size < 256:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is below 256, the byte alphabet "
                "a byte-level BPE starts from; raise it"
            )
        if self.max_train_chars < 1:
            raise ConfigError(f"tokenizer.max_train_chars={self.max_train_chars} must be a positive integer")
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.path is not set: give the tokenizer.json to load")
