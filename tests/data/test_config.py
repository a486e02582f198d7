"""Config schemas: defaults are valid, bad values fail with the key to change, YAML matches the dataclasses."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lego.data.config import DataConfig, TokenizerConfig
from lego.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_defaults_are_valid():
    DataConfig().validate()
    TokenizerConfig().validate()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"source": "web"}, "data.source"),
        ({"format": "csv"}, "data.format"),
        ({"source": "text_files"}, "data.files"),
        ({"source": "hf"}, "data.name"),
        ({"source": "token_files"}, "data.token_files.train"),
        ({"token_dtype": "int8"}, "data.token_dtype"),
        ({"text_column": ""}, "data.text_column"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"span_chars": 0}, "data.span_chars"),
        ({"max_train_tokens": 10}, "data.max_train_tokens"),
        ({"max_eval_tokens": 0}, "data.max_eval_tokens"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"test_fraction": 1.5}, "data.test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction"),
    ],
)
def test_bad_data_config(overrides, key):
    with pytest.raises(ConfigError, match=key) as error:
        DataConfig(**overrides).validate()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"kind": "wordpiece"}, "tokenizer.kind"),
        ({"vocab_size": 100}, "tokenizer.vocab_size"),
        ({"kind": "file"}, "tokenizer.path"),
        ({"max_train_chars": 0}, "tokenizer.max_train_chars"),
    ],
)
def test_bad_tokenizer_config(overrides, key):
    with pytest.raises(ConfigError, match=key):
        TokenizerConfig(**overrides).validate()


@pytest.mark.parametrize(("group", "schema"), [("data", DataConfig), ("tokenizer", TokenizerConfig)])
def test_yaml_files_match_the_dataclasses(group, schema):
    """Every option of the group names exactly the dataclass fields and merges into its structured schema."""
    files = sorted((CONF / group).glob("*.yaml"))
    assert files
    for file in files:
        options = OmegaConf.load(file)
        assert set(options) == {f.name for f in dataclasses.fields(schema)}, file.name
        merged = OmegaConf.merge(OmegaConf.structured(schema), options)
        assert merged.get("source", merged.get("kind")) == file.stem
