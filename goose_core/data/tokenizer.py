"""A byte-level tokenizer: 256 ids, no vocabulary file, nothing to download."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Each UTF-8 byte is a token. 256 divides by 2, 4 and 8, so the vocab splits over tp ranks."""

    vocab_size: int = 256

    def encode(self, text: str) -> Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return bytes(values).decode("utf-8", errors="replace")
