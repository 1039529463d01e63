"""How close a parallel run must come to the single-device run, stated once and explained."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "EXACT", "SPLIT", "REORDER", "SPLIT_ADAMW"]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise, for losses and parameters."""

    rtol: float
    atol: float
    why: str


#: Same operations in the same order: bit-identical, e.g. the reference run against itself.
EXACT = Tolerance(0.0, 0.0, "same operations in the same order must give the same bits")

#: The same sums cut into pieces (data shards, micro-batches, pipeline stages): only the order
#: in which fp32 partial sums meet changes, ~1 ulp per add, a few ulp after a few optimizer steps.
SPLIT = Tolerance(1e-5, 1e-6, "a batch split into shards or micro-batches changes only where "
                              "fp32 partial sums meet")

#: Layers split across ranks (tensor parallelism): matmuls split along the reduction dimension
#: change the summation order inside every block, forward and backward.
REORDER = Tolerance(1e-4, 1e-5, "matmuls split along their reduction dimension reorder fp32 "
                                "sums inside every layer")

#: SPLIT's sums under AdamW. Adam divides every gradient element by sqrt(v) + eps (eps = 1e-8),
#: so where a gradient element is near eps (a cancelling sum) an fp32 reordering error dg moves
#: the weight by about lr * dg / eps: ~1e-6 per step at lr 1e-3. Measured with no parallelism at
#: all (one device, gradient accumulation over 4 and 8 micro-batches, 3 AdamW steps, tiny models):
#: max abs error 8.0e-6 (llama, 8 pieces), 5.0e-6 (bloom, 4); with SGD the same splits stay
#: within 7.5e-9, far inside SPLIT. Check the gradients themselves with SGD at SPLIT.
SPLIT_ADAMW = Tolerance(1e-5, 1e-5, "AdamW divides by sqrt(v) + eps, amplifying SPLIT's reordering "
                                    "where gradient elements are near eps")
