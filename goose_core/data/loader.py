"""The shipped corpus served as fixed, seeded batches (optionally padded), and each data-parallel
rank's shard."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from goose_core.data.tokenizer import ByteTokenizer

__all__ = ["CORPUS_PATH", "PAD_ID", "PADDINGS", "corpus_ids", "get_batch", "pad_batch", "shard_batch"]

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

Batch = dict[str, Tensor]

#: The id a padded position holds (its label is ``-100`` and its attention-mask entry 0).
PAD_ID = 0

#: How :func:`pad_batch` makes rows hold different numbers of targets.
PADDINGS = ("ignore", "right", "left", "empty")


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


def pad_batch(batch: Batch, padding: str, step: int = 0, seed: int = 0) -> Batch:
    """``batch`` with rows of uneven real length, the same on every rank and every run.

    Row r keeps ``L_r`` real tokens, ``L_r`` drawn from ``[1, seq_len]`` by a generator seeded
    by ``(seed, step)`` (a row with one token has no target at all). The rest of the row is::

        ignore   labels -100 before the last L_r tokens (a prompt that is not a target)
        right    [t t t _ _]  padding after the real tokens   ) _ = PAD_ID, label -100,
        left     [_ _ t t t]  padding before them             )     attention_mask 0
        empty    the last half of the rows all padding, the first half all real

    so data-parallel shards and micro-batches hold different numbers of targets ("empty": some
    hold none). Padded variants carry an ``attention_mask``.

    Raises:
        ValueError: ``padding`` is not one of :data:`PADDINGS`.
    """
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {PADDINGS}")
    ids = batch["input_ids"]
    rows, seq_len = ids.shape
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)
    length = torch.randint(1, seq_len + 1, (rows, 1), generator=gen)
    if padding == "empty":
        length = torch.where(torch.arange(rows).unsqueeze(1) < rows // 2, seq_len, 0)
    position = torch.arange(seq_len).unsqueeze(0)
    real = position >= seq_len - length if padding in ("left", "ignore") else position < length
    labels = batch["labels"].masked_fill(~real, -100)
    if padding == "ignore":
        return {**batch, "labels": labels}
    return {**batch, "input_ids": ids.masked_fill(~real, PAD_ID), "labels": labels,
            "attention_mask": real.long()}
