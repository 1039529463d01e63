"""Falcon: its module layout for the pipeline split (it declares no ``base_model_pp_plan``).

Falcon's own forward builds ALiBi or rotary tables and the mask on every stage. No
tensor-parallel half yet.
"""

from __future__ import annotations

from goose_core.models.family import Family, PipelineLayout

__all__ = ["LAYOUT", "FAMILY"]

LAYOUT = PipelineLayout(embed=("transformer.word_embeddings",), blocks="transformer.h",
                        head=("transformer.ln_f", "lm_head"))

FAMILY = Family("falcon", pp=LAYOUT)
