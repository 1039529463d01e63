"""full_state_dict: a parallelized model's parameters as complete tensors under their HF names.

Each parallelism leaves a footprint that this module undoes, so that any layout can be compared
with (or exported as) the single-device model:

* tensor parallelism splits a parameter along one dimension; the layer that split it marks the
  parameter with a :class:`ShardSpec` saying how the pieces go back together;
* pipeline parallelism leaves each stage holding only some parameters, under their original
  names; the stages' dictionaries are merged over the pipeline group;
* data parallelism (and ZeRO-1, which all-gathers after every step) keeps parameters replicated,
  so nothing is gathered over the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext

__all__ = ["ShardSpec", "mark_sharded", "shard_spec", "full_state_dict"]

_ATTR = "_goose_shard"


@dataclass(frozen=True)
class ShardSpec:
    """How a tensor-parallel parameter was cut.

    Args:
        dim: the dimension split across the tensor-parallel group.
        blocks: a fused parameter (GPT-2's ``c_attn`` is q|k|v) is ``blocks`` equal blocks along
            ``dim``, each split across ranks separately; rank r holds block_0[r] | block_1[r] | ...
        replicas: consecutive tp ranks holding the same shard (GQA with more tp ranks than
            key/value heads: ranks 2k and 2k+1 share kv-head k at replicas=2); gather keeps one.
    """

    dim: int
    blocks: int = 1
    replicas: int = 1

    def gather(self, shards: list[Tensor]) -> Tensor:
        """Reassemble the full tensor from every rank's shard, in tp-rank order."""
        per_rank = [s.chunk(self.blocks, dim=self.dim) for s in shards[::self.replicas]]
        return torch.cat([piece for b in range(self.blocks) for piece in (p[b] for p in per_rank)],
                         dim=self.dim)


def mark_sharded(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    """Record on ``param`` how it was split, for :func:`full_state_dict`."""
    setattr(param, _ATTR, spec)
    return param


def shard_spec(param: Tensor) -> ShardSpec | None:
    """The :class:`ShardSpec` of ``param``, or None if it is whole on this rank."""
    return getattr(param, _ATTR, None)


def _unshard(param: Tensor, ctx: ParallelContext) -> Tensor:
    spec = shard_spec(param)
    local = param.detach()
    if spec is None or ctx.tensor_parallel_size == 1:
        return local.cpu().clone()
    shards = [torch.empty_like(local) for _ in range(ctx.tensor_parallel_size)]
    dist.all_gather(shards, local.contiguous(), group=ctx.tensor_parallel_group)
    return spec.gather([s.cpu() for s in shards])


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, Tensor]:
    """Every parameter of the unparallelized model, complete, on CPU, on every rank.

    Collective over the tensor- and pipeline-parallel groups: call it on every rank.
    """
    local = {name: _unshard(p, ctx) for name, p in model.named_parameters()}
    if ctx.pipeline_parallel_size == 1:
        return local
    stages: list[dict[str, Tensor] | None] = [None] * ctx.pipeline_parallel_size
    dist.all_gather_object(stages, local, group=ctx.pipeline_parallel_group)
    merged: dict[str, Tensor] = {}
    for stage in stages:
        for name, tensor in (stage or {}).items():
            merged.setdefault(name, tensor)
    return merged
