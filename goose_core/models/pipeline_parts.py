"""Pipeline parts of the families that declare no ``base_model_pp_plan``: one table, by model type.

Each entry says only where a family's pieces are; the split runs the family's own forward
(masks per layer type, Mamba masks, rotary tables, multipliers) on every stage. Most have the
standard shape, with the final norm or the embedding under another name::

    model.embed_tokens -> model.layers[0..L) -> model.norm -> lm_head

Every entry was read against the family's modeling code in transformers 5.24 and checked by the
sweep (``python -m sweep --families ... --modes pp2,tp2xpp2``): equal to
the single-device run (the MoE ones with ``output_router_logits=False``; their router loss is
:mod:`goose_core.pipeline.router_loss`'s to carry or refuse). Goose does not guess this shape for a family missing here: whether a
parent's forward does something between the blocks that a pass-through breaks (a recurrent
loop, a norm used before and after them, a block output unpacked as a tuple, a scale applied
only to looked-up ids) is not visible from the module tree.

Families whose blocks do not run once each in order, or run differently on each stage, are
refused by name (:data:`REFUSED`).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from goose_core.models import gpt2
from goose_core.models.family import PipelineParts, unsplittable

__all__ = ["decoder", "PIPELINE_PARTS", "REFUSED"]


def decoder(norm: str | None = "norm", embed: str = "embed_tokens", tuple_blocks: bool = False) -> PipelineParts:
    """The standard shape: ``model.<embed>``, ``model.layers``, ``model.<norm>`` and ``lm_head``
    (``norm=None``: a final norm without parameters that the parent also calls before the blocks
    stays on every stage)."""
    head = ("lm_head",) if norm is None else (f"model.{norm}", "lm_head")
    return PipelineParts(embed=(f"model.{embed}",), blocks="model.layers", head=head, tuple_blocks=tuple_blocks)


def _no_layerdrop(config: PretrainedConfig) -> list[str]:
    if getattr(config, "layerdrop", 0.0):
        return [f"{config.model_type} with layerdrop={config.layerdrop}: the parent draws a random skip per "
                f"block, and each stage draws its own; set config.layerdrop=0.0 or use pp=1"]
    return []


def _no_shared_topk(config: PretrainedConfig) -> list[str]:
    shared = [i for i, kind in enumerate(getattr(config, "indexer_types", None) or []) if kind == "shared"]
    if shared:
        return [f"{config.model_type}: layers {shared} are 'shared' in config.indexer_types and reuse the previous "
                f"full layer's top-k token selection, which goose does not carry between stages; use pp=1"]
    return []


#: model_type -> its pipeline parts. The comments say what the family's parent does that the split keeps.
PIPELINE_PARTS: dict[str, PipelineParts] = {
    # the standard shape, plain
    "diffllama": decoder(),
    "hunyuan_v1_dense": decoder(),
    "nemotron": decoder(),          # LayerNorm1P
    "llama4_text": decoder(),       # chunked-attention masks; base_model_prefix is not the attribute
    # mixtures of experts (the router loss: goose_core.pipeline.router_loss)
    "granitemoe": decoder(),        # embedding multiplier, logits scaling: the parent's
    "granitemoeshared": decoder(),
    "granitemoe_swa": decoder(),    # per-layer rope theta and sliding masks
    "hunyuan_v1_moe": decoder(),
    "olmoe": decoder(),
    # hybrids: the parent builds the attention and the recurrent (Mamba / conv) masks per layer type
    "bamba": decoder("final_layernorm", tuple_blocks=True),  # unpacks (hidden, attn_weights)
    "falcon_h1": decoder("final_layernorm"),  # embedding multiplier applied to the looked-up ids
    "jamba": decoder("final_layernorm"),
    "granitemoehybrid": decoder(),
    "nemotron_h": decoder("norm_f", embed="embeddings"),
    "lfm2": decoder("embedding_norm"),  # its final norm is named embedding_norm
    "lfm3": decoder("embedding_norm"),
    # others
    "persimmon": decoder("final_layernorm"),
    "nanochat": decoder(None),      # its parameterless norm runs before the blocks and after
    # declares a plan, but its blocks return (hidden, top-k indices), the next block's input
    "glm_moe_dsa": PipelineParts(embed=("model.embed_tokens",), blocks="model.layers",
                                  head=("model.norm", "lm_head"), tuple_blocks=True, check=_no_shared_topk),
    "gpt_neo": gpt2.PARTS,         # GPT-2's module names; local/global attention in the blocks
    "gpt_bigcode": gpt2.PARTS,
    "biogpt": PipelineParts(embed=("biogpt.embed_tokens", "biogpt.embed_positions"), blocks="biogpt.layers",
                             head=("biogpt.layer_norm", "output_projection"), check=_no_layerdrop),
}

#: model_type -> why the split refuses it whatever its config.
REFUSED: dict[str, PipelineParts] = {
    "dory": unsplittable(
        "Dory runs its recurrent section's blocks n_recurrent_loops times per forward, each loop restarting "
        "from the input section's normed output: a stage cannot own a contiguous share of one pass; use pp=1"),
    "phimoe": unsplittable(
        "PhiMoE's router (sparsemixer) draws random numbers in training (torch.rand_like in every MoE "
        "layer): each stage draws from its own generator, so the routing would differ from one device's; "
        "use pp=1"),
    "hrm_text": unsplittable(
        "HRM runs its two block stacks (L_module, H_module) H_cycles x L_cycles times, mixing their states "
        "in the parent: there is no single list of blocks run once each to cut into stages; use pp=1"),
}
