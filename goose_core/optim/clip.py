"""Global gradient-norm clipping across every group the parameters are split over.

The norm is that of the whole single-device model's gradient. Each rank adds up only the
gradient pieces it *owns*, and one all-reduce over all ranks sums the owners::

    piece                                      owned by                     why
    tp shard (shard_spec(p) is not None)       tp ranks with tp_rank % replicas == 0
                                                                            shards are disjoint
    tp-replicated parameter                    tp_rank 0                    count once, not tp times
    ZeRO-1 gradient shard (DistributedOptimizer)  every dp rank             shards are disjoint
    an expert (ExpertParallel: mark_expert)    dp ranks 0 .. E-1 (the first each expert once: its expert-
                                                 EP group)                    data-parallel group's rank 0
    anything else (replicated over dp)         dp_rank 0                    count once, not dp times
    pipeline stages                            the stage holding it         stages are disjoint
    a tied copy on another stage               nobody: mark_duplicate(p)    the original counts

Parameters tied across pipeline stages (GPT-2's embedding on the first stage and ``lm_head``
on the last) exist twice; mark the second copy with :func:`mark_duplicate` (the pipeline
engine does), or pass ``is_duplicate``. Every rank calls ``clip_grad_norm_`` (it is collective
over the whole world) and scales all of its gradients, owned or not, by the same coefficient.

The same all-reduce agrees whether any rank's gradients hold inf/nan (:mod:`goose_core.finite`):
finite, the optimizer step's own check needs no collective; not, and the check is on, the
gradients are left unscaled for the step to name where they went bad (``torch``'s clip would
multiply them all by nan first).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import names_missing
from goose_core.distributed.progress import note
from goose_core.finite import local_flag, stops, vouch
from goose_core.metadata import (expert_group_of, grad_shards, is_dp_shard, is_duplicate, mark_dp_shard,
                                 mark_duplicate, shard_spec)

# mark_duplicate and mark_dp_shard live in goose_core.metadata; re-exported where clipping needs them.
__all__ = ["clip_grad_norm_", "mark_duplicate", "mark_dp_shard", "norm_kind"]


def norm_kind(param: Tensor) -> tuple[int, bool]:
    """What decides who counts ``param`` in the norm: (tp replicas or 0 if whole, duplicate).

    ZeRO-1 keeps parameters of different kinds in different buckets, so each gradient shard
    is counted by one rule.
    """
    spec = shard_spec(param)
    return (spec.replicas if spec is not None else 0, is_duplicate(param))


def _expand(parameters: Iterable[Tensor]) -> list[Tensor]:
    """The tensors whose gradients make up the norm, ZeRO-1 shards in place of their params."""
    out: dict[int, Tensor] = {}
    for p in parameters:
        shards = grad_shards(p)
        for t in shards() if shards is not None else [p]:
            out.setdefault(id(t), t)
    return list(out.values())


def _owned(p: Tensor, ctx: ParallelContext, duplicate: Callable[[Tensor], bool] | None) -> bool:
    if is_duplicate(p) or (duplicate is not None and duplicate(p)):
        return False
    spec = shard_spec(p)
    replicas = spec.replicas if spec is not None else ctx.tensor_parallel_size
    if ctx.tensor_parallel_rank % replicas:
        return False
    if expert_group_of(p) is not None:
        return ctx.data_parallel_rank < ctx.experts.size
    return is_dp_shard(p) or ctx.replica_rank == 0  # one of the dp x cp replicas counts it


def _total_norm(owned: list[Tensor], flag: Tensor, norm_type: float, device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, bool]:
    """The norm over every rank, and whether any rank's gradients hold inf/nan (``flag``: this
    rank's, owned or not), agreed in the same all-reduce: a second element costs no latency."""
    if math.isinf(norm_type):
        maxes = [g.abs().max().to(dtype) for g in owned]
        local = torch.stack(maxes).max() if maxes else torch.zeros((), dtype=dtype, device=device)
        both = torch.stack([local, flag.to(local)])
        _all_reduce(both, dist.ReduceOp.MAX)  # the flag, not the max: MAX may drop a nan
        return both[0], bool(both[1])
    norms = [torch.linalg.vector_norm(g, norm_type).to(dtype) for g in owned]
    local = torch.stack(norms).pow(norm_type).sum() if norms else torch.zeros((), dtype=dtype, device=device)
    both = torch.stack([local, flag.to(local)])
    _all_reduce(both, dist.ReduceOp.SUM)
    return both[0].pow(1.0 / norm_type), bool(both[1])


def _all_reduce(local: Tensor, op: dist.ReduceOp) -> None:
    note("clip_grad_norm_: the global norm's all-reduce")
    _world_all_reduce(local, dist.group.WORLD, op)


@names_missing
def _world_all_reduce(local: Tensor, group: dist.ProcessGroup, op: dist.ReduceOp) -> None:
    dist.all_reduce(local, op=op, group=group)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, ctx: ParallelContext,
                    norm_type: float = 2.0, *,
                    is_duplicate: Callable[[Tensor], bool] | None = None) -> Tensor:
    """Scale gradients in place so the whole model's gradient norm is at most ``max_norm``.

    The same maths as ``torch.nn.utils.clip_grad_norm_`` on the single-device model, for
    parameters split over tensor-, pipeline- and data-parallel ranks (see the module docstring
    for who counts what). Collective over every rank of ``ctx``.

    Args:
        parameters: this rank's parameters (``model.parameters()``); parameters managed by a
            DistributedOptimizer are replaced by its gradient shards automatically.
        max_norm: the largest allowed total norm.
        ctx: the parallel context (its coordinates decide ownership).
        norm_type: the p of the p-norm; ``float("inf")`` for the max-norm.
        is_duplicate: returns True for parameters to leave out of the norm (tied copies).

    Returns:
        The total norm before clipping (a scalar tensor, the same on every rank).

    Raises:
        ValueError: ``max_norm`` is negative or ``norm_type`` is not positive.
    """
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (2.0, or float('inf')), got {norm_type!r}")
    tensors = [t for t in _expand(parameters) if t.grad is not None]
    owned = [t.grad.detach() for t in tensors if _owned(t, ctx, is_duplicate)]
    # fp32 at least (half-precision squares overflow), the gradients' own precision above it
    # (torch's clip in fp64 computes in fp64); every rank must agree, owned gradients or not.
    dtype = torch.promote_types(tensors[0].grad.dtype if tensors else torch.float32, torch.float32)
    flag = local_flag(tensors, ctx.device)
    total, non_finite = _total_norm(owned, flag, float(norm_type), ctx.device, dtype)
    if non_finite and stops(tensors):
        return total  # gradients left as they are: the optimizer step names where (or a GradScaler skips it)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for t in tensors:
        t.grad.detach().mul_(coef.to(t.grad.device, t.grad.dtype))
    if not non_finite:
        vouch(tensors)  # agreed finite on every rank: the step's check needs no all-reduce
    return total
