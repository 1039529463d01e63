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

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.missing import names_missing

__all__ = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
]


# -- raw (non-autograd) building blocks, all with the signature (tensor, group, dim) ----------
def _identity(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    return x.view_as(x)  # a view, not x itself: autograd needs a distinct output


@names_missing
def _all_reduce(x: Tensor, group: dist.ProcessGroup, dim: int = 0) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


@names_missing
def _all_gather(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunks(x: Tensor, group: dist.ProcessGroup, dim: int) -> tuple[Tensor, ...]:
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {size} equal parts")
    return x.chunk(size, dim=dim)


def _split(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    return _chunks(x, group, dim)[dist.get_rank(group)].contiguous()


@names_missing
def _reduce_scatter(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    chunks = [c.contiguous() for c in _chunks(x, group, dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


Raw = Callable[[Tensor, dist.ProcessGroup, int], Tensor]


def _function(name: str, forward: Raw, backward: Raw) -> type[torch.autograd.Function]:
    """An autograd Function running ``forward`` and, on the gradient, ``backward``."""

    def fwd(ctx: Any, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return forward(x, group, dim)

    def bwd(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return backward(grad, ctx.group, ctx.dim), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# The table in the module docstring, as code: (forward, backward) of each op.
_AllReduce = _function("_AllReduce", _all_reduce, _all_reduce)
_AllGather = _function("_AllGather", _all_gather, _reduce_scatter)
_ReduceScatter = _function("_ReduceScatter", _reduce_scatter, _all_gather)
_CopyToRegion = _function("_CopyToRegion", _identity, _all_reduce)
_ReduceFromRegion = _function("_ReduceFromRegion", _all_reduce, _identity)
_ScatterToRegion = _function("_ScatterToRegion", _split, _all_gather)
_GatherFromRegion = _function("_GatherFromRegion", _all_gather, _split)


# -- public API: a group of one is the identity, with no communication -----------------------
def _alone(group: dist.ProcessGroup) -> bool:
    return dist.get_world_size(group) == 1


def all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group; backward all-reduces the gradient (loss = sum of ranks' losses)."""
    return x if _alone(group) else _AllReduce.apply(x, group, 0)


def all_gather(x: Tensor, group: dist.ProcessGroup, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; backward reduce-scatters the gradient."""
    return x if _alone(group) else _AllGather.apply(x, group, dim)


def reduce_scatter(x: Tensor, group: dist.ProcessGroup, dim: int = 0) -> Tensor:
    """Sum over the group, keep this rank's slice along ``dim``; backward all-gathers."""
    return x if _alone(group) else _ReduceScatter.apply(x, group, dim)


def copy_to_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Megatron's ``f``: identity forward, all-reduce backward (enters a parallel region)."""
    return x if _alone(group) else _CopyToRegion.apply(x, group, 0)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Megatron's ``g``: all-reduce forward, identity backward (leaves a parallel region)."""
    return x if _alone(group) else _ReduceFromRegion.apply(x, group, 0)


def scatter_to_region(x: Tensor, group: dist.ProcessGroup, dim: int = -1) -> Tensor:
    """Keep this rank's slice of a replicated tensor; backward all-gathers the gradient."""
    return x if _alone(group) else _ScatterToRegion.apply(x, group, dim)


def gather_from_region(x: Tensor, group: dist.ProcessGroup, dim: int = -1) -> Tensor:
    """All-gather slices into a replicated tensor; backward keeps this rank's slice."""
    return x if _alone(group) else _GatherFromRegion.apply(x, group, dim)
