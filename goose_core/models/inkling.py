"""Inkling (1, 2 and 2-Loop text models): the declared tensor-parallel plan with its experts packed.

Each expert's ``gate_up_proj`` is ``(2 x intermediate, hidden)``, gate rows then up rows, and the
experts' forward chunks the product into gate | up. transformers 5.24 declares it plain
``colwise``, which would give the first rank only gates and the last only ups (goose refuses
that by name); ``packed_colwise`` cuts each half by the ranks, so rank r holds gate_r | up_r.
The pipeline half is the config's own plan.
"""

from __future__ import annotations

from goose_core.models.declared import declared_tp_plan
from goose_core.models.family import Family, TensorParallelAdapter

__all__ = ["FAMILIES", "PACKED"]

#: The entry that replaces the declared plain split.
PACKED = {"layers.*.mlp.experts.gate_up_proj": "packed_colwise"}

FAMILIES = tuple(Family(t, tp=TensorParallelAdapter({**declared_tp_plan(t), **PACKED}))
                 for t in ("inkling_text", "inkling2_text", "inkling2_loop_text"))
