"""Micro-batches: cut every batched input into M equal chunks, and glue the outputs back."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["check_microbatches", "scatter", "gather"]


def check_microbatches(batch_size: int, num_microbatches: int) -> None:
    """Raise a ValueError naming the fix unless ``batch_size`` splits into ``num_microbatches``.

    Raises:
        ValueError: ``num_microbatches < 1`` or ``batch_size % num_microbatches != 0``.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if batch_size % num_microbatches != 0:
        raise ValueError(f"a batch of {batch_size} does not split into {num_microbatches} equal "
                         f"micro-batches: use a batch size divisible by {num_microbatches} or a "
                         f"num_microbatches that divides {batch_size}")


def scatter(inputs: Mapping[str, Any], num_microbatches: int) -> list[dict[str, Any]]:
    """Split each tensor of ``inputs`` along dim 0 into ``num_microbatches`` equal chunks.

    Every tensor must be batched (same dim-0 size); non-tensors (flags, None) are copied into
    every micro-batch unchanged.

    Raises:
        ValueError: no batched tensor, tensors of different batch sizes, or a batch that does not
            divide (see :func:`check_microbatches`).
    """
    tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
    sizes = {k: v.shape[0] for k, v in tensors.items() if v.dim() > 0}
    if not sizes:
        raise ValueError("the pipeline needs at least one batched tensor input (e.g. input_ids)")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batched inputs disagree on the batch size: {sizes}")
    batch_size = next(iter(sizes.values()))
    check_microbatches(batch_size, num_microbatches)
    chunks = {k: v.chunk(num_microbatches) for k, v in tensors.items()}
    return [{**inputs, **{k: c[i] for k, c in chunks.items()}} for i in range(num_microbatches)]


def gather(outputs: list[Tensor]) -> Tensor:
    """The micro-batch outputs concatenated back into one batch (dim 0)."""
    return torch.cat(outputs)

