"""Which sequence positions each cp rank holds: causal load balancing, and the batch sliced by it.

Under a causal mask a query sees only the keys before it, so the rank holding the end of the
sequence has far more work than the one holding its start. Cut the sequence into 2C chunks and
give rank i chunks i and 2C-1-i: every rank then holds one early and one late chunk, and the
same number of (query, key) pairs to score (torchtitan's head-tail balancing)::

    S = 16, C = 2:  chunks  [0..3] [4..7] [8..11] [12..15]
                            rank 0  rank 1 rank 1  rank 0

    causal work (key blocks at or before each query chunk, 2C = 4):
    rank 0: chunk 0 (1) + chunk 3 (4) = 5        rank 1: chunk 1 (2) + chunk 2 (3) = 5

Every rank of a cp group is fed the same (dp shard of the) batch; :func:`slice_batch` keeps its
own positions. Labels are shifted BEFORE slicing: the target of a slice's last token is the
first token of the next chunk, which another rank holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from goose_core.loss import targets_of

__all__ = ["balanced_positions", "slice_batch"]


def balanced_positions(seq_len: int, size: int) -> tuple[Tensor, ...]:
    """positions[r]: the global positions cp rank r holds (chunks r and 2C-1-r), in order.

    Raises:
        ValueError: ``seq_len`` does not divide into ``2 * size`` chunks.
    """
    if seq_len % (2 * size):
        raise ValueError(f"context parallelism over {size} ranks cuts the sequence into 2 * {size} = "
                         f"{2 * size} equal chunks, but the sequence length is {seq_len}; pad the "
                         f"batch to a multiple of {2 * size} (attention_mask 0, labels -100)")
    chunk = seq_len // (2 * size)
    span = lambda i: torch.arange(i * chunk, (i + 1) * chunk)  # noqa: E731
    return tuple(torch.cat([span(r), span(2 * size - 1 - r)]) for r in range(size))


def slice_batch(kwargs: dict[str, Any], positions: Tensor) -> dict[str, Any]:
    """A model call's keyword batch with every [b, S] tensor cut to ``positions``: ``input_ids``,
    ``attention_mask``, ``position_ids`` (made from the global positions when absent: rotary and
    learned positions must see where a token really is), and ``labels`` shifted first, passed on
    as ``shift_labels`` (goose's and 🤗's causal-LM loss then take them as they are)."""
    out = dict(kwargs)
    ids = kwargs.get("input_ids")
    ids = ids if ids is not None else kwargs["inputs_embeds"]
    batch = ids.shape[0]
    where = positions.to(ids.device)
    for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
        if kwargs.get(name) is not None:
            out[name] = kwargs[name][:, where]
    if kwargs.get("position_ids") is None:
        out["position_ids"] = where.unsqueeze(0).expand(batch, -1)
    labels = kwargs.get("labels")
    if labels is not None:
        shifted = kwargs.get("shift_labels")
        shifted = (shifted if shifted is not None else targets_of(labels))[:, where]
        out["labels"] = shifted  # what the model checks for; the loss reads shift_labels
        out["shift_labels"] = shifted
    return out
