"""Stage 04: each differentiable collective equals its single-process equivalent, forward and backward.

Every rank r holds x_r = a seeded tensor of r. The single-process equivalent stacks all x_r on
one device and runs the same maths with plain torch ops; autograd on that gives the gradients
each rank must see. The loss on rank r is (y_r * w_r).sum() with a per-rank weight w_r, so a
wrong backward (summing where it should split, or the reverse) changes the numbers.
"""

from typing import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from goose_core import ParallelContext
from goose_core.distributed import (
    all_gather, all_reduce, copy_to_region, gather_from_region, reduce_from_region,
    reduce_scatter, scatter_to_region,
)
from goose_core.testing import PARALLEL, run_distributed

SHAPE = (4, 8)
# float64: sums over ranks in another order than the reference's differ by fp64 noise only.
TOL = dict(rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def _x(rank: int) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _w(rank: int, shape: torch.Size) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(200 + rank), dtype=torch.float64)


# For each op: the rank-local call, and what rank r's output is as a function of every rank's x.
def _reference(name: str, xs: list[Tensor], r: int, n: int, dim: int) -> Tensor:
    total = sum(xs)
    return {
        "all_reduce": lambda: total,
        "all_gather": lambda: torch.cat(xs, dim=dim),
        "reduce_scatter": lambda: total.chunk(n, dim=dim)[r],
        "copy_to_region": lambda: xs[r],
        "reduce_from_region": lambda: total,
        "scatter_to_region": lambda: xs[r].chunk(n, dim=dim)[r],
        "gather_from_region": lambda: torch.cat(xs, dim=dim),
    }[name]()


OPS: dict[str, Callable[[Tensor, dist.ProcessGroup, int], Tensor]] = {
    "all_reduce": lambda x, g, d: all_reduce(x, g),
    "all_gather": lambda x, g, d: all_gather(x, g, d),
    "reduce_scatter": lambda x, g, d: reduce_scatter(x, g, d),
    "copy_to_region": lambda x, g, d: copy_to_region(x, g),
    "reduce_from_region": lambda x, g, d: reduce_from_region(x, g),
    "scatter_to_region": lambda x, g, d: scatter_to_region(x, g, d),
    "gather_from_region": lambda x, g, d: gather_from_region(x, g, d),
}

# Megatron's conjugates assume a replicated continuation: the same loss on every rank.
REPLICATED = {"reduce_from_region", "gather_from_region", "copy_to_region", "scatter_to_region"}


def _expected_grad(name: str, n: int, me: int, dim: int) -> tuple[Tensor, Tensor]:
    xs = [_x(r).requires_grad_() for r in range(n)]
    outs = [_reference(name, xs, r, n, dim) for r in range(n)]
    if name in REPLICATED and name not in ("copy_to_region", "scatter_to_region"):
        loss = (outs[0] * _w(0, outs[0].shape)).sum()  # replicated output: one loss, counted once
    elif name in ("copy_to_region", "scatter_to_region"):
        # Entering a region: the input is replicated (every rank holds x_0), outputs differ.
        xs = [xs[0]] * n
        outs = [_reference(name, xs, r, n, dim) for r in range(n)]
        loss = sum((o * _w(r, o.shape)).sum() for r, o in enumerate(outs))
    else:
        loss = sum((o * _w(r, o.shape)).sum() for r, o in enumerate(outs))
    loss.backward()
    return outs[me].detach(), xs[me].grad


def _check(ctx: ParallelContext, axis: str) -> None:
    group, n, me = ctx.group(axis), ctx.size(axis), ctx.local_rank(axis)
    for name, op in OPS.items():
        for dim in (0, 1, -1):
            if name in ("copy_to_region", "scatter_to_region"):
                x = _x(0).requires_grad_()  # the region's input is replicated
            else:
                x = _x(me).requires_grad_()
            y = op(x, group, dim)
            w = _w(0 if name in ("reduce_from_region", "gather_from_region") else me, y.shape)
            (y * w).sum().backward()
            want_y, want_grad = _expected_grad(name, n, me, dim)
            torch.testing.assert_close(y, want_y, **TOL, msg=f"{name} dim={dim} forward")
            torch.testing.assert_close(x.grad, want_grad, **TOL,
                                       msg=f"{name} dim={dim} backward")


def _check_all_axes(ctx: ParallelContext) -> None:
    for axis in ("tp", "pp", "dp"):
        _check(ctx, axis)


@pytest.mark.parametrize("tp, pp, dp", [(2, 1, 2), (4, 1, 1), (1, 2, 1)])
def test_collectives_match_single_process(tp: int, pp: int, dp: int) -> None:
    run_distributed(_check_all_axes, tp, pp, dp, timeout=120)
