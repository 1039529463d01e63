"""``goose train``: a 🤗 causal LM trained on local text at any layout, from a TOML file and flags."""

from goose_core.train.config import ConfigError, TrainConfig, load_toml, merge, validate
from goose_core.train.cli import build_parser, main, parse, train_main

__all__ = ["ConfigError", "TrainConfig", "build_parser", "load_toml", "main", "merge", "parse", "train_main",
           "validate"]
