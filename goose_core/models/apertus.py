"""Apertus (and Apertus 1.5's text model): the declared tensor-parallel plan plus its xIELU activation.

The MLP's activation is xIELU, with two learnable scalars (``alpha_p``, ``alpha_n``) applied
elementwise to the intermediate activations, which tensor parallelism splits by columns::

    up_proj (colwise) -> act_fn: alpha * f(x_r)  (x_r: this rank's columns) -> down_proj (rowwise)

Each rank's gradient of a scalar is the sum over its own columns only; the single-device
gradient is the sum over all of them. ``replicated_with_grad_allreduce`` on ``act_fn`` sums
it over the tp ranks (the declared plan leaves it out, and goose's first-backward check
refuses the model without it). The pipeline half is the config's own plan.
"""

from __future__ import annotations

from goose_core.models.declared import declared_tp_plan
from goose_core.models.family import Family, TensorParallelAdapter

__all__ = ["FAMILIES", "ACTIVATION"]

#: The plan entry the declared plans lack.
ACTIVATION = {"layers.*.mlp.act_fn": "replicated_with_grad_allreduce"}

FAMILIES = tuple(Family(t, tp=TensorParallelAdapter({**declared_tp_plan(t), **ACTIVATION}))
                 for t in ("apertus", "apertus1p5_text"))
