"""The token stream of a set of documents cached on disk, keyed by their text and the tokenizer.

A run that restarts (a resume after a crash, every rank of it) reads the stream back instead of
tokenizing again. The key is a digest of every document's text, in order, and of the tokenizer's
``fingerprint`` (its files and the library versions) and EOS, so any change of either misses;
seq_len and the split are applied after the cache, so changing them reuses it. Files are written
beside and renamed into place: ranks that write the same entry at once leave one whole file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["cache_key", "load_tokens", "save_tokens"]

_FORMAT = b"goose-tokens-v1"


def cache_key(texts: Sequence[str], tok: Any) -> str | None:
    """The entry's name for ``texts`` under ``tok``; None when ``tok`` has no ``fingerprint``."""
    fingerprint = getattr(tok, "fingerprint", None)
    if not fingerprint:
        return None
    digest = hashlib.sha256(_FORMAT + f"\0{fingerprint}\0{getattr(tok, 'eos_id', None)}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)  # lengths: "ab"+"c" differs from "a"+"bc"
    return digest.hexdigest()[:32]


def _path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"tokens-{key}.pt"


def load_tokens(cache_dir: str | os.PathLike, key: str) -> Tensor | None:
    """The cached stream (int64), or None if absent or unreadable."""
    path = _path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True).long()
    except Exception:  # a truncated or foreign file: tokenize again and overwrite it
        return None


def save_tokens(cache_dir: str | os.PathLike, key: str, tokens: Tensor) -> None:
    """Store ``tokens`` (int32 when every id fits) atomically under ``key``."""
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = tokens.to(torch.int32) if len(tokens) == 0 or int(tokens.max()) < 2**31 else tokens
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(small, partial)
    os.replace(partial, path)
