"""StableLM: a Llama-shaped tensor-parallel plan, and its pipeline parts for the split.

StableLM declares neither plan. Its attention reads ``num_heads`` / ``num_key_value_heads`` from
itself, so goose's generic localize applies; the per-head q/k layer norms (``qk_layernorm``)
would need their weights split by heads and are refused under tp. Partial rotary
(``partial_rotary_factor``): the family's own forward builds the rotary table on every stage.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from goose_core.models.family import Family, PipelineParts, TensorParallelAdapter

__all__ = ["PLAN", "PARTS", "FAMILY", "check"]

PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}

PARTS = PipelineParts(embed=("model.embed_tokens",), blocks="model.layers", head=("model.norm", "lm_head"))


def check(config: PretrainedConfig, tp: int) -> list[str]:
    if tp > 1 and getattr(config, "qk_layernorm", False):
        return ["StableLM with qk_layernorm=True has per-head q/k norms goose does not split by heads; "
                "set config.qk_layernorm=False or use tp=1"]
    return []


FAMILY = Family("stablelm", tp=TensorParallelAdapter(PLAN, None, check), pp=PARTS)
