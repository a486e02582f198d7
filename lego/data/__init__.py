"""Data pipeline: corpus -> train/val/test token windows, with the tokenizer and a printable summary."""

from lego.data.config import DataConfig, TokenizerConfig
from lego.data.prepare import PreparedData, format_summary, prepare_data
from lego.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "TokenizerConfig", "PreparedData", "Tokenizer", "format_summary", "prepare_data"]
