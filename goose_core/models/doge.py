"""Doge: the declared tensor-parallel plan with its dynamic-mask attention made whole.

Doge's attention builds a per-kv-head mask from the values of every head::

    dt = dt_proj(values of all heads)      (kv-heads outputs)     declared: rowwise
    mask_h = exp(A_h * softplus(dt_h))     A: one scalar per kv-head
    mask repeated to the query heads, added to the scores

The declared ``rowwise`` sums every rank's heads into *all* kv-heads' dt on each rank, whose mask
then has the full head count beside this rank's split scores (a shape error). Each rank needs
the whole sum but only its own kv-heads of it, so ``dt_proj`` is ``rowwise_scatter_output``
(goose's: rowwise, then this rank's slice of the output; backward gathers the slices' gradient),
and ``A`` is split with the kv-heads (``colwise`` on the vector, its module ``local_params``).
The per-head q/k norms on split heads sum their gradient over the ranks
(``replicated_with_grad_allreduce``). kv-heads replicated over ranks (tp > kv-heads) would need
the mask of a replica's head: refused. The pipeline half is the config's own plan.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from goose_core.models.declared import declared_tp_plan
from goose_core.models.family import Family, TensorParallelAdapter

__all__ = ["FAMILY", "ATTENTION", "check"]

#: The entries that replace or complete the declared plan's attention.
ATTENTION = {
    "layers.*.self_attn.dt_proj": "rowwise_scatter_output",
    "layers.*.self_attn": "local_params",
    "layers.*.self_attn.A": "colwise",
    "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
}


def check(config: PretrainedConfig, tp: int) -> list[str]:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if tp > 1 and kv_heads % tp:
        return [f"Doge's dynamic mask is per kv-head: num_key_value_heads={kv_heads} must divide by tp={tp} "
                f"(goose does not replicate kv-heads for it)"]
    return []


FAMILY = Family("doge", tp=TensorParallelAdapter({**declared_tp_plan("doge"), **ATTENTION}, None, check))
