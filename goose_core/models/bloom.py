"""Bloom: head-interleaved fused QKV and ALiBi sliced per rank (tensor parallel); its pipeline parts.

Bloom declares no plan. Its ``query_key_value`` output is laid out head by head,
``[h0: q k v | h1: q k v | ...]``, so a plain contiguous column split already gives each rank
whole heads with their own q, k and v. The parent model builds the ALiBi bias for *all* heads,
``(batch * n_head, 1, seq)``; each rank's attention keeps its own heads' rows (a pre-hook), so a
decoder layer called alone by a pipeline stage still gets the right slopes.

The pipeline stages run Bloom's own forward (it builds the ALiBi tensor and the mask on every
stage); the first stage holds the embedding and its layer norm, the last the final norm and head.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.models.bloom.modeling_bloom import BloomAttention

from goose_core.models.family import Family, PipelineParts, TensorParallelAdapter

__all__ = ["PLAN", "PARTS", "FAMILY", "localize", "check", "slice_alibi"]

PLAN = {
    "h.*.self_attention.query_key_value": "colwise",
    "h.*.self_attention.dense": "rowwise",
    "h.*.mlp.dense_h_to_4h": "colwise",
    "h.*.mlp.dense_4h_to_h": "rowwise",
}

PARTS = PipelineParts(embed=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
                        blocks="transformer.h", head=("transformer.ln_f", "lm_head"))


def slice_alibi(alibi: Tensor, heads: int, tp: int, tp_rank: int) -> Tensor:
    """This rank's rows of the full ALiBi tensor ``(batch * heads, 1, seq)``."""
    batch = alibi.shape[0] // heads
    local = heads // tp
    mine = alibi.view(batch, heads, *alibi.shape[1:])[:, tp_rank * local:(tp_rank + 1) * local]
    return mine.reshape(batch * local, *alibi.shape[1:])


def _alibi_hook(heads: int, tp: int, tp_rank: int) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "alibi" in kwargs:
            kwargs["alibi"] = slice_alibi(kwargs["alibi"], heads, tp, tp_rank)
        else:  # forward(hidden_states, residual, alibi, ...)
            args = (*args[:2], slice_alibi(args[2], heads, tp, tp_rank), *args[3:])
        return args, kwargs
    return hook


def localize(model: nn.Module, tp: int, tp_rank: int) -> None:
    """Each attention computes ``n_head / tp`` heads and slices the parent's ALiBi to them."""
    for module in model.modules():
        if isinstance(module, BloomAttention):
            heads = module.num_heads
            module.num_heads = heads // tp
            if tp > 1:
                module.register_forward_pre_hook(_alibi_hook(heads, tp, tp_rank), with_kwargs=True)


def check(config: PretrainedConfig, tp: int) -> list[str]:
    if config.pretraining_tp > 1 and config.slow_but_exact:
        return ["Bloom with slow_but_exact=True re-slices dense layers by pretraining_tp; set "
                "config.slow_but_exact=False for tensor parallelism"]
    return []


FAMILY = Family("bloom", tp=TensorParallelAdapter(PLAN, localize, check), pp=PARTS)
