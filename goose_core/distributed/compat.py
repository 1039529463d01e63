"""Flat-buffer collectives that work on every supported torch, from the floor (2.11) up.

torch 2.13 renamed ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` to
``reduce_scatter_single`` / ``all_gather_single`` and deprecated the old names (a FutureWarning
per call site); torch 2.11 has only the old ones. Each call looks the new name up *at call time*
and falls back to the old one, so goose runs warning-free on new torch and still works at the
floor (a test deletes the new names from ``torch.distributed`` inside the ranks to prove it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from torch import Tensor

__all__ = ["reduce_scatter_flat", "all_gather_flat"]


def _either(new: str, old: str) -> Callable[..., Any]:
    return getattr(dist, new, None) or getattr(dist, old)


def reduce_scatter_flat(output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None,
                        async_op: bool = False) -> dist.Work | None:
    """Sum ``input`` (``world * len(output)`` elements) over ``group``; rank r keeps chunk r."""
    fn = _either("reduce_scatter_single", "reduce_scatter_tensor")
    return fn(output, input, group=group, async_op=async_op)


def all_gather_flat(output: Tensor, input: Tensor, group: dist.ProcessGroup | None = None,
                    async_op: bool = False) -> dist.Work | None:
    """Concatenate every rank's ``input`` into ``output`` (``world * len(input)`` elements)."""
    fn = _either("all_gather_single", "all_gather_into_tensor")
    return fn(output, input, group=group, async_op=async_op)
