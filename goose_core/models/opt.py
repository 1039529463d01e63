"""OPT: a tensor-parallel plan and its pipeline parts for the split (it declares neither).

Its attention reads ``num_heads`` from itself, so goose's generic localize applies. The first stage holds the token table, the learned positions (OPT offsets them by 2 and reads
the attention mask: the family's own forward does that) and the optional ``project_in``; the
last the final norm, the optional ``project_out`` and the head. No tensor-parallel half yet.
"""

from __future__ import annotations

from goose_core.models.family import Family, PipelineParts, TensorParallelAdapter

__all__ = ["PLAN", "PARTS", "FAMILY"]

PLAN = {
    "decoder.layers.*.self_attn.q_proj": "colwise",
    "decoder.layers.*.self_attn.k_proj": "colwise",
    "decoder.layers.*.self_attn.v_proj": "colwise",
    "decoder.layers.*.self_attn.out_proj": "rowwise",
    "decoder.layers.*.fc1": "colwise",
    "decoder.layers.*.fc2": "rowwise",
}

PARTS = PipelineParts(
    embed=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    blocks="model.decoder.layers",
    head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"))

FAMILY = Family("opt", tp=TensorParallelAdapter(PLAN), pp=PARTS)
