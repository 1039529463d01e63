"""Optimizers across ranks: ZeRO-1 (DistributedOptimizer) and global gradient-norm clipping."""

from goose_core.optim.clip import clip_grad_norm_, mark_dp_shard, mark_duplicate, norm_kind
from goose_core.optim.zero import DistributedOptimizer

__all__ = ["DistributedOptimizer", "clip_grad_norm_", "mark_dp_shard", "mark_duplicate", "norm_kind"]
