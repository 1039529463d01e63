"""All-to-all with uneven splits that autograd understands: the backward is the same exchange reversed.

Rank ``r`` sends ``send_counts[d]`` rows to each rank ``d`` of the group and receives
``recv_counts[s]`` rows from each rank ``s``; the gradient of the rows it received goes back
along the same pairs (``recv_counts`` out, ``send_counts`` in). gloo (torch 2.13, CPU) and NCCL
both implement ``all_to_all_single`` with uneven splits.

Every rank of the group must run the backward exchange once per forward one, or its peers wait:
a rank whose experts received no row (or whose rows reach the loss by no path) still joins it,
through ``anchor``, a tensor the exchange's output is made to depend on (its gradient is zero).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_to_all"]


def _exchange(x: Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor, send_counts: list[int], recv_counts: list[int],
                group: dist.ProcessGroup) -> Tensor:
        ctx.counts, ctx.group, ctx.anchor_shape = (send_counts, recv_counts), group, anchor.shape
        return _exchange(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        send_counts, recv_counts = ctx.counts
        back = _exchange(grad, recv_counts, send_counts, ctx.group)
        return back, grad.new_zeros(ctx.anchor_shape), None, None, None


def all_to_all(x: Tensor, send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup,
               anchor: Tensor | None = None) -> Tensor:
    """``x``'s rows, ``send_counts[d]`` of them in turn to rank ``d`` of ``group``; returns the
    ``sum(recv_counts)`` rows received, in source-rank order. ``anchor`` (requiring a gradient):
    ties the backward exchange to a tensor every rank's loss depends on (module docstring)."""
    return _AllToAll.apply(x, x if anchor is None else anchor, send_counts, recv_counts, group)
