"""full_state_dict: a parallelized model's parameters as complete tensors under their HF names.

Each parallelism leaves a footprint that this module undoes, so that any layout can be compared
with (or exported as) the single-device model:

* tensor parallelism splits a parameter along one dimension; the layer that split it marks the
  parameter with a :class:`~goose_core.metadata.ShardSpec` saying how the pieces go back together;
* pipeline parallelism leaves each stage holding only some parameters, under their original
  names; the stages' dictionaries are merged over the pipeline group;
* data parallelism (and ZeRO-1, which all-gathers after every step) keeps parameters replicated,
  so nothing is gathered over the data-parallel group;
* expert parallelism leaves each EP rank a run of every experts parameter's leading rows (its
  experts, :func:`~goose_core.metadata.mark_expert`): gathered over the expert-parallel group.

Tied weights appear under every name the single-device model's ``state_dict`` has (GPT-2's
``lm_head.weight`` beside ``transformer.wte.weight``), so a strict ``load_state_dict`` into a
fresh model works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext
from goose_core.data_parallel.zero3 import gathered
from goose_core.metadata import ShardSpec, expert_group_of, mark_sharded, shard_spec

# ShardSpec, mark_sharded and shard_spec live in goose_core.metadata; this was their first home.
__all__ = ["ShardSpec", "mark_sharded", "shard_spec", "full_state_dict"]


def _unshard(param: Tensor, ctx: ParallelContext) -> Tensor:
    spec = shard_spec(param)
    local = param.detach()
    if expert_group_of(param) is not None and ctx.experts.ep_group is not None:
        pieces = [torch.empty_like(local) for _ in range(ctx.experts.size)]
        dist.all_gather(pieces, local.contiguous(), group=ctx.experts.ep_group)
        return torch.cat(pieces).cpu()  # EP rank r holds experts [r N/E, (r+1) N/E)
    if spec is None or ctx.tensor_parallel_size == 1:
        return local.cpu().clone()
    shards = [torch.empty_like(local) for _ in range(ctx.tensor_parallel_size)]
    dist.all_gather(shards, local.contiguous(), group=ctx.tensor_parallel_group)
    return spec.gather([s.cpu() for s in shards])


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, Tensor]:
    """Every parameter of the unparallelized model, complete, on CPU, on every rank.

    Collective over the tensor- and pipeline-parallel groups: call it on every rank. A tied
    parameter is gathered once and appears under each of its names.
    """
    with gathered(model):  # ZeRO-3's shards made whole first (nothing to do otherwise)
        local = {name: _unshard(p, ctx) for name, p in model.named_parameters()}
    first = {p: name for name, p in model.named_parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        local.setdefault(name, local[first[p]])  # a tied alias (remove_duplicate dropped it)
    if ctx.pipeline_parallel_size == 1:
        return local
    stages: list[dict[str, Tensor] | None] = [None] * ctx.pipeline_parallel_size
    dist.all_gather_object(stages, local, group=ctx.pipeline_parallel_group)
    merged: dict[str, Tensor] = {}
    for stage in stages:
        for name, tensor in (stage or {}).items():
            merged.setdefault(name, tensor)
    return merged
