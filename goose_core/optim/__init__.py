"""Optimizers across ranks: ZeRO-1 (DistributedOptimizer), fp32 master weights, global gradient-norm clipping."""

from goose_core.optim.clip import clip_grad_norm_, mark_dp_shard, mark_duplicate, norm_kind
from goose_core.optim.master import MasterWeights
from goose_core.optim.zero import DistributedOptimizer

__all__ = ["DistributedOptimizer", "MasterWeights", "clip_grad_norm_", "mark_dp_shard", "mark_duplicate", "norm_kind"]
