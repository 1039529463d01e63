"""The same batch on every tensor-parallel peer and pipeline stage: a cheap check on the forward.

Only data-parallel ranks train on different shards. The ranks of a tensor-parallel group
compute slices of the same layers, and the stages of a pipeline take the same batch from the
training loop (the first stage uses its ``input_ids``, the last its ``labels``), so they must all
be fed the same one. A sampler over the whole world (``DistributedSampler(dataset)`` with its
defaults) gives every rank a shard of its own, and training runs on, wrong and silent. The
check costs one small all-reduce per group, on the first forward by default::

    every rank    c = per field (input_ids, attention_mask, labels, position_ids):
                      [given, rows, numel, sum(value * (position + 1)) mod 2**62]
    tp group      all-reduce MAX of [c, -c]          max and min over the group
    pp group      the same over the pipeline         (after both: over tp x pp)
    every rank    max != min for a field  ->  ValueError naming it, on every rank compared

Position weights make the sum differ when the same tokens come in another order. Only the
groups whose ranks must run the forward together anyway are used, so the check never waits on a
rank that would not otherwise take part.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import Axis
from goose_core.metadata import batch_check_of, set_batch_check

__all__ = ["BatchCheck", "FIELDS", "POLICIES", "batch_checksum", "check_policy", "check_same_batch",
           "extremes", "install_batch_check"]

#: The forward arguments compared (a fixed list: every rank's checksum has the same length).
FIELDS = ("input_ids", "attention_mask", "labels", "position_ids")
#: When the check runs: on the first forward, on every forward, or not at all.
POLICIES = ("first", "always", "never")

_PER_FIELD = 4
_MASK = 2**62 - 1  # keeps checksums non-negative, so -c never overflows
_WHO = {"tp": "tensor-parallel peers", "pp": "pipeline stages"}


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`.

    Raises:
        ValueError: any other value.
    """
    if policy not in POLICIES:
        raise ValueError(f"check_batch must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    return policy


def _as_int64(value: Tensor) -> Tensor:
    flat = value.detach().reshape(-1)
    if flat.is_floating_point():  # compare the exact bits, not rounded values
        return flat.to(torch.float64).contiguous().view(torch.int64)
    return flat.to(torch.int64)


def batch_checksum(batch: Mapping[str, Any]) -> Tensor:
    """Per field of :data:`FIELDS`: ``[given, rows, numel, position-weighted sum]`` (int64)."""
    parts: list[Tensor] = []
    for name in FIELDS:
        value = batch.get(name)
        if not isinstance(value, Tensor):
            parts.append(torch.zeros(_PER_FIELD, dtype=torch.int64))
            continue
        ints = _as_int64(value)
        weights = torch.arange(1, ints.numel() + 1, dtype=torch.int64, device=ints.device)
        total = torch.bitwise_and((ints * weights).sum(), _MASK).cpu()  # int64 wraps: still exact
        rows = value.shape[0] if value.dim() else 1
        parts.append(torch.cat([torch.tensor([1, rows, value.numel()]), total.reshape(1)]))
    return torch.cat(parts)


def extremes(values: Tensor, groups: Sequence[dist.ProcessGroup]) -> tuple[Tensor, Tensor]:
    """The elementwise max and min of ``values`` over the ranks of ``groups`` (one after the
    other: over their product), in one all-reduce per group: MAX of ``[values, -values]``.
    Collective: every rank of each group calls it. Values must negate exactly (integers)."""
    both = torch.cat([values.reshape(-1), -values.reshape(-1)])
    for group in groups:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = values.numel()
    return both[:n].view_as(values), -both[n:].view_as(values)


def check_same_batch(batch: Mapping[str, Any], ctx: ParallelContext, axes: Sequence[Axis]) -> None:
    """Raise on every rank compared if the ranks along ``axes`` were given different batches.

    Collective over ``ctx``'s group along each of ``axes`` (in order; axes of size 1 are
    skipped): every rank of those groups must call it.

    Raises:
        ValueError: a field of :data:`FIELDS` differs between the ranks compared.
    """
    axes = [axis for axis in axes if ctx.size(axis) > 1]
    if not axes:
        return
    high, low = extremes(batch_checksum(batch).to(ctx.device), [ctx.group(axis) for axis in axes])
    differ = (high != low).view(len(FIELDS), _PER_FIELD).any(dim=1).tolist()
    if any(differ):
        fields = ", ".join(name for name, bad in zip(FIELDS, differ) if bad)
        who = " and ".join(_WHO[axis] for axis in axes)
        raise ValueError(
            f"the {who} of data-parallel rank {ctx.dp_rank} were fed different batches ({fields} "
            f"differ): tensor-parallel peers and pipeline stages must all get the same batch, only "
            f"data-parallel ranks get different shards. Shard the data by data-parallel rank, not by "
            f"global rank: goose_core.data.shard_batch(batch, ctx.dp_rank, ctx.dp_size), or "
            f"DistributedSampler(dataset, num_replicas=ctx.dp_size, rank=ctx.dp_rank) (its defaults "
            f"shard over every rank of the world)")


class BatchCheck:
    """A forward pre-hook: :func:`check_same_batch` over the axes the wrappers registered.

    Positional calls are read as ``model(input_ids, ...)``; everything else by keyword.
    """

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.policies: dict[Axis, str] = {}
        self.checked: set[Axis] = set()

    def add(self, axis: Axis, policy: str) -> None:
        """Compare the ranks along ``axis`` per ``policy`` (one of :data:`POLICIES`)."""
        self.policies[axis] = check_policy(policy)

    def due(self) -> list[Axis]:
        """The axes the next forward compares, in registration order (the same on every rank)."""
        return [axis for axis, policy in self.policies.items()
                if policy == "always" or (policy == "first" and axis not in self.checked)]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        axes = self.due()
        if not axes:
            return
        batch = dict(kwargs)
        if args:
            batch.setdefault("input_ids", args[0])
        self.checked.update(axes)  # checked once, even when it raised: the run is over anyway
        check_same_batch(batch, self.ctx, axes)


def install_batch_check(model: nn.Module, ctx: ParallelContext, axis: Axis, policy: str) -> BatchCheck:
    """Check on ``model``'s forward that the ranks along ``axis`` get the same batch.

    One hook per model: a second wrapper (TensorParallel, then PipelineParallel) adds its axis
    to the same check, so the two groups are compared in one pass over the batch.
    """
    check = batch_check_of(model)
    if not isinstance(check, BatchCheck):
        check = BatchCheck(ctx)
        model.register_forward_pre_hook(check, with_kwargs=True)
        set_batch_check(model, check)
    check.add(axis, policy)
    return check
