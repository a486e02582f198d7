"""Data pipeline: corpus -> train/val/test token files and windows over them, with the tokenizer and a printable
summary."""

from lego.data.config import DataConfig, TokenizerConfig
from lego.data.prepare import PreparedData, format_summary, prepare_data
from lego.data.tokenizer import Tokenizer
from lego.data.tokens import TokenWindows

__all__ = [
    "DataConfig",
    "TokenizerConfig",
    "PreparedData",
    "Tokenizer",
    "TokenWindows",
    "format_summary",
    "prepare_data",
]
