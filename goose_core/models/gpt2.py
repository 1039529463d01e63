"""GPT-2: Conv1D layers and the fused q|k|v ``c_attn`` (tensor parallel); its pipeline parts.

GPT-2 declares no plan. Its ``Conv1D`` stores weights as ``(in, out)`` (the layers handle the
transposed layout), and ``c_attn`` computes ``q | k | v`` in one matmul, so its output is cut
as three blocks, each split by heads: rank r holds ``q_r | k_r | v_r``. The attention then
splits its output by ``split_size``, which becomes the per-rank width.

The pipeline stages run GPT-2's own forward; the first stage holds the token and position
tables (the parent adds them), the last the final norm and the head (tied to ``wte``).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from goose_core.models.family import Family, PipelineParts, TensorParallelAdapter

__all__ = ["PLAN", "PARTS", "FAMILY", "localize", "check"]

PLAN = {
    "h.*.attn.c_attn": "fused_qkv_colwise",
    "h.*.attn.c_proj": "rowwise",
    "h.*.mlp.c_fc": "colwise",
    "h.*.mlp.c_proj": "rowwise",
}

PARTS = PipelineParts(embed=("transformer.wte", "transformer.wpe", "transformer.drop"),
                        blocks="transformer.h", head=("transformer.ln_f", "lm_head"))


def localize(model: nn.Module, tp: int, tp_rank: int) -> None:
    """Each attention computes ``num_heads / tp`` heads of width ``embed_dim / tp``."""
    for module in model.modules():
        if isinstance(module, GPT2Attention):
            module.num_heads //= tp
            module.split_size //= tp
            module.embed_dim //= tp


def check(config: PretrainedConfig, tp: int) -> list[str]:
    if getattr(config, "add_cross_attention", False):
        return ["GPT-2 cross-attention (add_cross_attention=True) has no tensor-parallel plan in goose"]
    return []


FAMILY = Family("gpt2", tp=TensorParallelAdapter(PLAN, localize, check), pp=PARTS)
