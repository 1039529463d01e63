"""Unit tests of clip_grad_norm_: the whole model's norm, whichever way parameters are split."""

import math

import pytest
import torch
from torch import Tensor, nn

from goose_core import DistributedOptimizer, ParallelContext, clip_grad_norm_
from goose_core.optim import mark_duplicate
from goose_core.state import ShardSpec, mark_sharded
from goose_core.testing import PARALLEL, run_distributed

# float64 gradients, so the comparisons are at PARALLEL whatever the CPU's kernels.
# The single-device model: a column-split layer, a row-split layer (its bias replicated over tp),
# a GQA-style weight that both tp ranks hold whole (replicas=2), a weight tied across stages.
SHAPES = {"col.weight": (8, 4), "col.bias": (8,), "row.weight": (4, 8), "row.bias": (4,),
          "kv.weight": (4, 4), "tied.weight": (6, 4)}
STAGE = {"col.weight": 0, "col.bias": 0, "tied.weight": 0, "row.weight": 1, "row.bias": 1, "kv.weight": 1}
SPLIT_DIM = {"col.weight": 0, "col.bias": 0, "row.weight": 1}


def _grads(dp_rank: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(100 + dp_rank)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in SHAPES.items()}


def _full_grads(dp: int) -> dict[str, Tensor]:
    """The gradient of the single-device model: the mean of every dp rank's gradient."""
    per_rank = [_grads(r) for r in range(dp)]
    return {name: sum(g[name] for g in per_rank) / dp for name in SHAPES}


def _reference(dp: int, max_norm: float, norm_type: float) -> tuple[float, dict[str, Tensor]]:
    params = {name: nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for name, shape in SHAPES.items()}
    for name, g in _full_grads(dp).items():
        params[name].grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm, norm_type)
    return float(total), {name: p.grad for name, p in params.items()}


def _local(name: str, full: Tensor, ctx: ParallelContext) -> nn.Parameter:
    if name in SPLIT_DIM and ctx.tp_size > 1:
        dim = SPLIT_DIM[name]
        return mark_sharded(nn.Parameter(full.chunk(ctx.tp_size, dim)[ctx.tp_rank].clone()), ShardSpec(dim))
    param = nn.Parameter(full.clone())
    return mark_sharded(param, ShardSpec(0, replicas=2)) if name == "kv.weight" and ctx.tp_size == 2 else param


def _stage_params(ctx: ParallelContext) -> dict[str, nn.Parameter]:
    """This rank's parameters, gradients set to this dp rank's local gradient (sliced for tp)."""
    params = {}
    for name, grad in _grads(ctx.dp_rank).items():
        on_stage = ctx.pp_size == 1 or STAGE[name] == ctx.pp_rank
        if name == "tied.weight" and ctx.pp_size == 2 and ctx.pp_rank == 1:
            params[name] = mark_duplicate(_local(name, torch.zeros(SHAPES[name], dtype=torch.float64), ctx))  # the tied copy
            params[name].grad = _local(name, _full_grads(ctx.dp_size)[name], ctx).detach()
            continue
        if on_stage:
            params[name] = _local(name, torch.zeros(SHAPES[name], dtype=torch.float64), ctx)
            params[name].grad = _local(name, grad, ctx).detach()
    return params


def _clip(ctx: ParallelContext, zero: bool, max_norm: float, norm_type: float) -> tuple[float, dict[str, Tensor]]:
    params = _stage_params(ctx)
    if zero:  # gradients differ per dp rank; ZeRO-1 reduce-scatters them into shards
        optimizer = DistributedOptimizer(torch.optim.SGD(params.values(), lr=1.0), ctx)
        total = clip_grad_norm_(params.values(), max_norm, ctx, norm_type)
        optimizer.step()  # p <- 0 - clipped gradient: the clipped shards, gathered back
        return float(total), {name: -p.detach() for name, p in params.items()}
    total = clip_grad_norm_(params.values(), max_norm, ctx, norm_type)
    return float(total), {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_tensor_and_pipeline_splits_give_the_whole_model_norm(norm_type: float) -> None:
    want_total, want = _reference(1, 1.0, norm_type)
    for rank, (total, grads) in enumerate(run_distributed(_clip, 2, 2, 1, False, 1.0, norm_type, timeout=60)):
        assert total == pytest.approx(want_total, rel=PARALLEL.rtol) and total > 1.0  # the test clips
        for name, got in grads.items():
            expected = want[name]
            if got.shape != expected.shape:  # a tp shard: rank = pp_rank * 2 + tp_rank
                expected = expected.chunk(2, SPLIT_DIM[name])[rank % 2]
            torch.testing.assert_close(got, expected, rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def test_data_parallel_replicas_count_once() -> None:
    results = run_distributed(_clip, 1, 1, 2, False, 1.0, 2.0, timeout=60)
    # plain DP: every rank holds its own (different) local gradient here, so compare rank by rank
    for total, grads in results:
        assert total > 1.0
    want_total = torch.linalg.vector_norm(torch.stack([g.norm() for g in _grads(0).values()]))
    assert results[0][0] == pytest.approx(float(want_total), rel=PARALLEL.rtol)
    assert results[1][0] == pytest.approx(float(want_total), rel=PARALLEL.rtol)  # dp rank 0's gradient counts


@pytest.mark.parametrize("tp", [1, 2])
def test_zero1_gradient_shards_sum_over_data_parallel(tp: int) -> None:
    results = run_distributed(_clip, tp, 1, 2, True, 1.0, 2.0, timeout=60)
    want_total, want = _reference(2, 1.0, 2.0)
    for rank, (total, params) in enumerate(results):
        assert total == pytest.approx(want_total, rel=PARALLEL.rtol)
        for name, got in params.items():
            expected = want[name]
            if got.shape != expected.shape:
                expected = expected.chunk(tp, SPLIT_DIM[name])[rank % tp]
            torch.testing.assert_close(got, expected, rtol=PARALLEL.rtol, atol=PARALLEL.atol)


def _bad(ctx: ParallelContext, max_norm: float, norm_type: float) -> str:
    with pytest.raises(ValueError) as err:
        clip_grad_norm_([nn.Parameter(torch.ones(2))], max_norm, ctx, norm_type)
    return str(err.value)


def test_bad_arguments_are_clear_errors() -> None:
    assert "max_norm must be >= 0" in run_distributed(_bad, 1, 1, 1, -1.0, 2.0, timeout=30)[0]
    assert "norm_type must be > 0" in run_distributed(_bad, 1, 1, 1, 1.0, 0.0, timeout=30)[0]
