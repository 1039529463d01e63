"""Context parallelism: the sequence split over cp ranks around attention."""

from goose_core.context_parallel.ulysses import kv_repeats, ulysses_attention

__all__ = ["kv_repeats", "ulysses_attention"]
