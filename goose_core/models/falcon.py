"""Falcon: its pipeline parts for the split (it declares no ``base_model_pp_plan``).

Falcon's own forward builds ALiBi or rotary tables and the mask on every stage. No
tensor-parallel half yet.
"""

from __future__ import annotations

from goose_core.models.family import Family, PipelineParts

__all__ = ["PARTS", "FAMILY"]

PARTS = PipelineParts(embed=("transformer.word_embeddings",), blocks="transformer.h",
                        head=("transformer.ln_f", "lm_head"))

FAMILY = Family("falcon", pp=PARTS)
