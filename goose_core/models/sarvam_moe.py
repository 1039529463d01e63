"""Sarvam-MoE: the declared tensor-parallel plan plus its per-head q/k norms.

Its attention normalises each head's query and key (``q_norm``, ``k_norm``: one weight of
``head_dim`` shared by all heads) after ``q_proj`` / ``k_proj``, which tensor parallelism splits
by heads: each rank's weight gradient covers its own heads only. The declared plan leaves them
out (Qwen3 and Glm4-MoE's other users declare them ``replicated_with_grad_allreduce``, which
sums the gradient over the tp ranks); goose's first-backward check refuses the model without
them. The pipeline half is the config's own plan.
"""

from __future__ import annotations

from goose_core.models.declared import declared_tp_plan
from goose_core.models.family import Family, TensorParallelAdapter

__all__ = ["FAMILY", "QK_NORMS"]

#: The plan entries the declared plan lacks.
QK_NORMS = {"layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
            "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce"}

FAMILY = Family("sarvam_moe", tp=TensorParallelAdapter({**declared_tp_plan("sarvam_moe"), **QK_NORMS}))
