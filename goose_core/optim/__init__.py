"""Optimizers across ranks: ZeRO-1/2 (DistributedOptimizer), fp32 master weights, global gradient-norm clipping, ZeRO's cost."""

from goose_core.optim.clip import clip_grad_norm_, mark_dp_shard, mark_duplicate, norm_kind
from goose_core.optim.master import MasterWeights
from goose_core.optim.zero import DistributedOptimizer
from goose_core.optim.zero_cost import ZeroCost, unit_numels, zero_cost

__all__ = ["DistributedOptimizer", "MasterWeights", "ZeroCost", "clip_grad_norm_", "mark_dp_shard", "mark_duplicate",
           "norm_kind", "unit_numels", "zero_cost"]
