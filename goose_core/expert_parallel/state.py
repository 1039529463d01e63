"""The whole experts of an expert-parallel model: each EP rank's slice gathered, in expert order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext
from goose_core.metadata import expert_group_of

__all__ = ["gather_experts"]


def gather_experts(model: nn.Module, ctx: ParallelContext) -> dict[str, Tensor]:
    """Every expert parameter of ``model`` by name, whole (all N experts, CPU): one all-gather
    per parameter over the expert-parallel group (collective: every EP rank calls it)."""
    group, size = ctx.experts.ep_group, ctx.experts.size
    out = {}
    for name, p in model.named_parameters():
        if expert_group_of(p) is None:
            continue
        if group is None:
            out[name] = p.detach().cpu().clone()
            continue
        pieces = [torch.empty_like(p) for _ in range(size)]
        dist.all_gather(pieces, p.detach().contiguous(), group=group)
        out[name] = torch.cat(pieces).cpu()
    return out
