"""Data-parallel replicas must start identical: broadcast from dp rank 0, or check and say why not."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.metadata import expert_group_of

__all__ = ["broadcast_replicas", "check_replicas", "expert_groups"]


def _tensors(module: nn.Module, group: dist.ProcessGroup) -> list[tuple[str, Tensor]]:
    """The tensors ``group``'s ranks must hold alike: an expert (ExpertParallel) is alike over its
    own expert-data-parallel group only, and checked there."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(name, t) for name, t in named if t.numel() and expert_group_of(t) in (None, group)]


def expert_groups(module: nn.Module) -> list[dist.ProcessGroup]:
    """The expert-data-parallel groups of ``module``'s experts, once each, in parameter order."""
    found: dict[int, dist.ProcessGroup] = {}
    for p in module.parameters():
        group = expert_group_of(p)
        if group is not None:
            found.setdefault(id(group), group)
    return list(found.values())


def _source(group: dist.ProcessGroup) -> int:
    return dist.get_global_rank(group, 0)


def broadcast_replicas(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Overwrite every parameter and buffer with dp rank 0's (collective over ``group``)."""
    with torch.no_grad():
        for _, t in _tensors(module, group):
            dist.broadcast(t.data, src=_source(group), group=group)


def check_replicas(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Raise ValueError on every rank if any parameter or buffer differs from dp rank 0's.

    Exact (bitwise) comparison: rank 0's values are broadcast and compared, then the first
    differing index is agreed on with an all-reduce so that every rank raises the same error.
    """
    tensors = _tensors(module, group)
    first_bad = len(tensors)
    with torch.no_grad():
        for idx, (_, t) in enumerate(tensors):
            theirs = t.detach().clone()
            dist.broadcast(theirs, src=_source(group), group=group)
            if first_bad == len(tensors) and not torch.equal(theirs, t.detach()):
                first_bad = idx
    flag = torch.tensor([first_bad], dtype=torch.int64, device=tensors[0][1].device if tensors else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if int(flag) < len(tensors):
        name = tensors[int(flag)][0]
        raise ValueError(
            f"{name!r} differs between data-parallel replicas: every dp rank must start from the "
            f"same weights; build the model after ParallelContext (it seeds every rank alike) or "
            f"pass broadcast=True to DataParallel to copy dp rank 0's values"
        )
