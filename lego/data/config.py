"""Config schemas for the `data` and `tokenizer` groups.

Plain dataclasses so that the data code stays free of Hydra: the runner registers them in Hydra's
ConfigStore, and `validate()` turns out-of-range values into a one-line `ConfigError` naming the key.
"""

from dataclasses import dataclass, field

from lego.errors import ConfigError, check_one_of

SOURCES = ("austen", "text_files", "hf")
FORMATS = ("auto", "text", "json", "parquet")
TOKENIZER_KINDS = ("bpe", "bytes", "file")


@dataclass
class DataConfig:
    source: str = "austen"  # "austen" (embedded, default) | "text_files" | "hf"
    files: list[str] = field(default_factory=list)  # text_files: paths or globs
    format: str = "auto"  # text_files: "auto" (by extension) | "text" | "json" | "parquet"
    name: str | None = None  # hf: dataset name on the hub, e.g. "wikitext"
    config_name: str | None = None  # hf: dataset config, e.g. "wikitext-2-raw-v1"
    split: str = "train"  # hf: split to read; our train/val/test are carved out of it
    text_column: str = "text"  # json/parquet/hf: column holding the text
    seq_len: int = 128  # tokens per input sequence (windows hold seq_len + 1)
    batch_size: int = 16
    max_train_tokens: int | None = None  # cap on training tokens (None: all)
    max_eval_tokens: int | None = None  # cap on validation and on test tokens (None: all)
    val_fraction: float = 0.05  # share of spans held out for early stopping / calibration
    test_fraction: float = 0.05  # share of spans held out for the final report only
    span_chars: int = 20000  # documents are cut into contiguous spans of about this many characters
    split_seed: int = 0  # deals spans to train/val/test; independent of the run's `seed` (model init, data order)

    def validate(self) -> None:
        """Reject values that cannot work before any file is read."""
        check_one_of("data.source", self.source, SOURCES)
        check_one_of("data.format", self.format, FORMATS)
        if self.source == "text_files" and not self.files:
            raise ConfigError("data.files is empty: pass the corpus files, e.g. data.files=[a.txt,b.jsonl]")
        if self.source == "hf" and not self.name:
            raise ConfigError("data.name is not set: name a hub dataset, e.g. data.name=wikitext")
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


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (trained on the train split, cached) | "bytes" (vocab 256) | "file"
    vocab_size: int = 4096  # bpe only: target vocabulary size (at least the 256 bytes)
    path: str | None = None  # file: a tokenizer.json saved by HF `tokenizers`

    def validate(self) -> None:
        """Reject values that cannot work before any file is read."""
        check_one_of("tokenizer.kind", self.kind, TOKENIZER_KINDS)
        if self.kind == "bpe" and self.vocab_size < 256:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is below 256, the byte alphabet "
                "a byte-level BPE starts from; raise it"
            )
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.path is not set: give the tokenizer.json to load")
