"""Collectives as autograd functions: plain sum semantics, and Megatron's f/g conjugate pairs.

Two families, because "the gradient of a collective" depends on what runs after it:

* ``all_reduce``, ``all_gather``, ``reduce_scatter`` are exact: the total loss is the *sum* of
  every rank's loss, so each backward is the adjoint collective (all-reduce <-> all-reduce,
  all-gather <-> reduce-scatter).
* Megatron's conjugates assume what follows is *replicated* on every rank of the group (same
  values, same loss, same gradient), so the adjoint must not add the copies up::

        op                   forward        backward
        copy_to_region   f   identity       all-reduce
        reduce_from_region g all-reduce     identity
        scatter_to_region    keep my slice  all-gather
        gather_from_region   all-gather     keep my slice

  A column-parallel layer starts with ``f``; the row-parallel layer that follows ends with ``g``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
]


# -- raw (non-autograd) building blocks ------------------------------------------------------
def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {size} equal parts")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {size} equal parts")
    chunks = [c.contiguous() for c in x.chunk(size, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


# -- autograd functions ----------------------------------------------------------------------
class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _split(grad, ctx.group, ctx.dim), None, None


# -- public API: a group of one is the identity, with no communication -----------------------
def _alone(group: dist.ProcessGroup) -> bool:
    return dist.get_world_size(group) == 1


def all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group; backward all-reduces the gradient (loss = sum of ranks' losses)."""
    return x if _alone(group) else _AllReduce.apply(x, group)


def all_gather(x: Tensor, group: dist.ProcessGroup, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; backward reduce-scatters the gradient."""
    return x if _alone(group) else _AllGather.apply(x, group, dim)


def reduce_scatter(x: Tensor, group: dist.ProcessGroup, dim: int = 0) -> Tensor:
    """Sum over the group, keep this rank's slice along ``dim``; backward all-gathers."""
    return x if _alone(group) else _ReduceScatter.apply(x, group, dim)


def copy_to_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Megatron's ``f``: identity forward, all-reduce backward (enters a parallel region)."""
    return x if _alone(group) else _CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Megatron's ``g``: all-reduce forward, identity backward (leaves a parallel region)."""
    return x if _alone(group) else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: Tensor, group: dist.ProcessGroup, dim: int = -1) -> Tensor:
    """Keep this rank's slice of a replicated tensor; backward all-gathers the gradient."""
    return x if _alone(group) else _ScatterToRegion.apply(x, group, dim)


def gather_from_region(x: Tensor, group: dist.ProcessGroup, dim: int = -1) -> Tensor:
    """All-gather slices into a replicated tensor; backward keeps this rank's slice."""
    return x if _alone(group) else _GatherFromRegion.apply(x, group, dim)
