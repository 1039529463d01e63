"""Context parallelism: each cp rank holds a slice of every sequence (ring or Ulysses attention)."""

from goose_core.context_parallel.attention import CP_ATTENTION
from goose_core.context_parallel.ring import RingSpec, ring_attention
from goose_core.context_parallel.slicing import balanced_positions, slice_batch
from goose_core.context_parallel.ulysses import kv_repeats, ulysses_attention
from goose_core.context_parallel.wrapper import METHODS, ContextParallel

__all__ = ["ContextParallel", "METHODS", "CP_ATTENTION", "RingSpec", "ring_attention", "balanced_positions",
           "slice_batch", "kv_repeats", "ulysses_attention"]
