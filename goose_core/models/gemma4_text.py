"""Gemma 4 (text, and unified text): its pipeline parts, and two features the split refuses.

Gemma 4's parent computes, before the blocks, a per-layer input for every block (a lookup of
``input_ids`` in ``embed_tokens_per_layer`` mixed with a projection of the token embedding), and
its last ``num_kv_shared_layers`` blocks reuse the keys and values an earlier block of their
attention type stored during the same forward::

    parent: embed_tokens(ids) ──┬─> blocks 0 .. L-1 ─> norm ─> lm_head
            embed_tokens_per_layer(ids), per_layer_model_projection ─> per_layer_inputs[:, :, i]
    block i >= L - num_kv_shared_layers: k, v = shared_kv_states[its type]  (stored by an earlier block)

Neither travels between stages (a later stage would project zeros, or find no stored keys), so
both are refused under pp; without them the family's own forward splits like Gemma 3's.
Gemma 4 unified shares the key/value sharing (it has no per-layer inputs).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from goose_core.models.family import Family, PipelineParts

__all__ = ["PARTS", "FAMILIES", "check"]


def check(config: PretrainedConfig) -> list[str]:
    problems = []
    if getattr(config, "hidden_size_per_layer_input", 0):
        problems.append(
            f"Gemma 4 with per-layer inputs (hidden_size_per_layer_input={config.hidden_size_per_layer_input}): "
            f"every block reads an input the parent projects from the first stage's token embedding, which "
            f"goose does not carry between stages; set config.hidden_size_per_layer_input=0 or use pp=1")
    if getattr(config, "num_kv_shared_layers", 0):
        problems.append(
            f"Gemma 4 with num_kv_shared_layers={config.num_kv_shared_layers}: its last blocks reuse the keys "
            f"and values an earlier block stored during the same forward, which goose does not carry between "
            f"stages; set config.num_kv_shared_layers=0 or use pp=1")
    return problems


PARTS = PipelineParts(embed=("model.embed_tokens",), blocks="model.layers", head=("model.norm", "lm_head"),
                        check=check)

FAMILIES = (Family("gemma4_text", pp=PARTS), Family("gemma4_unified_text", pp=PARTS))
