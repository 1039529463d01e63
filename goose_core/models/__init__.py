"""Per-family tensor-parallel adapters for HF models that declare no ``base_model_tp_plan``."""

from goose_core.models import bloom, gpt2

__all__ = ["bloom", "gpt2"]
