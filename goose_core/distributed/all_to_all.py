"""All-to-all that autograd understands: split one dim over the group, gather another; the backward is the reverse exchange.

Rank ``r`` splits ``x`` along ``scatter = (dim, sizes)`` and sends part ``d`` to rank ``d``;
what rank ``s`` sent comes back concatenated along ``gather = (dim, sizes)``, its part being
``sizes[s]`` long there. Slices may be uneven (gloo and NCCL both run ``all_to_all_single`` with
uneven splits). Two uses::

    Ulysses (context parallelism)   scatter heads (dim 1, even), gather the sequence (dim 2)
    expert dispatch                 scatter rows by destination (dim 0, counts), gather rows (dim 0)

The backward sends the gradient of what a rank received back along the same pairs (scatter and
gather swapped). Every rank of the group must run that exchange once per forward one, or its
peers wait: a rank whose received rows reach the loss by no path (an expert that got no token)
still joins it through ``anchor``, a tensor the output is made to depend on (its gradient is zero).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.missing import names_missing

__all__ = ["Split", "all_to_all"]

#: ``(dim, sizes)``: ``sizes[r]`` is rank r's part along ``dim``.
Split = tuple[int, list[int]]


@names_missing
def _exchange(x: Tensor, group: dist.ProcessGroup, scatter: Split, gather: Split) -> Tensor:
    (s_dim, s_sizes), (g_dim, g_sizes) = scatter, gather
    me = dist.get_rank(group)
    # The scattered dim first: each rank's part is then one run of the flat buffer (one copy).
    send = x.movedim(s_dim, 0).contiguous()
    g_front = g_dim + 1 if g_dim < s_dim else g_dim  # where g_dim went in ``send``
    shapes = [[s_sizes[me], *send.shape[1:]] for _ in g_sizes]
    for shape, size in zip(shapes, g_sizes):
        shape[g_front] = size
    counts = [math.prod(s) for s in shapes]
    recv = send.new_empty(sum(counts))
    row = math.prod(send.shape[1:])  # elements a row (a rank may send none)
    dist.all_to_all_single(recv, send.view(-1), output_split_sizes=counts,
                           input_split_sizes=[n * row for n in s_sizes], group=group)
    pieces = recv.split(counts)
    return torch.cat([p.view(s) for p, s in zip(pieces, shapes)], dim=g_front).movedim(0, s_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor, group: dist.ProcessGroup, scatter: Split,
                gather: Split) -> Tensor:
        ctx.group, ctx.scatter, ctx.gather, ctx.anchor_shape = group, scatter, gather, anchor.shape
        return _exchange(x, group, scatter, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        back = _exchange(grad, ctx.group, ctx.gather, ctx.scatter)
        return back, grad.new_zeros(ctx.anchor_shape), None, None, None


def all_to_all(x: Tensor, group: dist.ProcessGroup, scatter: Split, gather: Split,
               anchor: Tensor | None = None) -> Tensor:
    """``x`` split along ``scatter``, part r to rank r of ``group``; returns the parts received,
    concatenated in rank order along ``gather`` (module docstring). ``anchor`` (requiring a
    gradient): ties the backward exchange to a tensor every rank's loss depends on."""
    return _AllToAll.apply(x, x if anchor is None else anchor, group, scatter, gather)
