"""The shipped corpus served as fixed, seeded batches, and each data-parallel rank's shard."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from goose_core.data.tokenizer import ByteTokenizer

__all__ = ["CORPUS_PATH", "corpus_ids", "get_batch", "shard_batch"]

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

Batch = dict[str, Tensor]


@lru_cache(maxsize=1)
def corpus_ids() -> Tensor:
    """The whole shipped corpus as token ids (1-D, int64)."""
    return ByteTokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8"))


def get_batch(step: int, batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> Batch:
    """The global batch for ``step``: the same on every rank and every run.

    Windows start at offsets drawn from a generator seeded by ``(seed, step)``, so any step can
    be produced without replaying the ones before it (resume needs exactly this). ``labels``
    equal ``input_ids``: HF causal LMs shift them inside ``forward``.
    """
    ids = corpus_ids()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=gen)
    input_ids = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous slice of every tensor in ``batch`` (split along dim 0).

    Raises:
        ValueError: the batch size does not divide by ``world_size``.
    """
    size = next(iter(batch.values())).shape[0]
    if size % world_size:
        raise ValueError(f"batch size {size} does not divide into {world_size} data-parallel shards; "
                         f"use a batch size that is a multiple of {world_size}")
    per = size // world_size
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
