"""Megatron-style tensor parallelism for HF causal LMs: layers, vocab-parallel loss, RNG, plans."""

from goose_core.tensor_parallel.cross_entropy import VocabParallelCausalLMLoss, vocab_parallel_cross_entropy
from goose_core.tensor_parallel.layers import (
    ColumnParallelEmbedding,
    ColumnParallelLinear,
    ParallelRegion,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_tensor,
    split_embedding,
)
from goose_core.tensor_parallel.parallelize import TensorParallel, apply_styles, localize_heads, rng_tracker
from goose_core.tensor_parallel.plan import ADAPTERS, Adapter, TPPlan, check_sizes, register_adapter, resolve_plan
from goose_core.tensor_parallel.random import RNGTracker

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ColumnParallelEmbedding",
    "ColumnParallelLinear",
    "ParallelRegion",
    "RNGTracker",
    "RowParallelLinear",
    "TPPlan",
    "TensorParallel",
    "VocabParallelCausalLMLoss",
    "VocabParallelEmbedding",
    "apply_styles",
    "check_sizes",
    "localize_heads",
    "register_adapter",
    "resolve_plan",
    "rng_tracker",
    "shard_tensor",
    "split_embedding",
    "vocab_parallel_cross_entropy",
]
