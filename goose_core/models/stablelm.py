"""StableLM: its module layout for the pipeline split (it declares no ``base_model_pp_plan``).

Llama-shaped, with partial rotary (``partial_rotary_factor``): the family's own forward builds
the rotary table on every stage. No tensor-parallel half yet.
"""

from __future__ import annotations

from goose_core.models.family import Family, PipelineLayout

__all__ = ["LAYOUT", "FAMILY"]

LAYOUT = PipelineLayout(embed=("model.embed_tokens",), blocks="model.layers", head=("model.norm", "lm_head"))

FAMILY = Family("stablelm", pp=LAYOUT)
