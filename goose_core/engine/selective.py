"""The selective recompute policy: keep what costs FLOPs (matmuls, attention), recompute the rest.

``recompute="selective"`` recomputes each transformer block op by op: torch's selective
checkpoint (:func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`) asks this
policy, for every aten op the block's forward runs, whether to keep its output or run it again
in the backward. The policy, stated once::

    keep       every op torch's FLOP counter counts (torch.utils.flop_counter's registry):
               mm, addmm, bmm, baddbmm, the fused attentions (sdpa), convolutions
    recompute  everything else: layer norms, activations, residual adds, dropout (its RNG
               state replayed), the attention scaling, mask and softmax of an eager attention,
               views, copies, casts, and the tensor-parallel all-reduce (run again, as the
               whole-block modes run it)

So the recompute costs no counted FLOP: the backward runs only the ops that are cheap per byte
of memory they would hold. torchtitan's op-level policy differs in one place: it keeps every
*other* ``mm`` (recomputing half the matmuls for memory) and the output of ``max`` (for float8
scales); goose keeps every matmul, so the recompute is the minimum any policy that keeps the
same tensors could do.

The policy also records the tensors it keeps (``kept``), so the block that runs it can show
them to saved-tensor hooks (activation accounting; see :mod:`goose_core.engine.block_recompute`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext
from torch.utils.flop_counter import flop_registry

__all__ = ["KeepMatmuls", "keep_matmuls", "keeps"]


def keeps(op: torch._ops.OpOverload) -> bool:
    """Whether the selective policy keeps ``op``'s output: the ops the FLOP counter counts."""
    return op._overloadpacket in flop_registry


def keep_matmuls(ctx: SelectiveCheckpointContext, op: torch._ops.OpOverload, *args: Any,
                 **kwargs: Any) -> CheckpointPolicy:
    """The selective policy, stateless (what a compiled block traces)."""
    return CheckpointPolicy.MUST_SAVE if keeps(op) else CheckpointPolicy.PREFER_RECOMPUTE


class KeepMatmuls:
    """The selective policy of one eager block forward (:func:`keep_matmuls`), recording in
    ``kept`` the outputs it keeps (a fresh instance per forward)."""

    def __init__(self) -> None:
        self.kept: list[Tensor] = []

    def __call__(self, ctx: SelectiveCheckpointContext, op: torch._ops.OpOverload, *args: Any,
                 **kwargs: Any) -> CheckpointPolicy:
        if not keeps(op):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if not ctx.is_recompute:
            self.kept.extend(t for t in tree_leaves(ctx.op_output) if isinstance(t, Tensor))
        return CheckpointPolicy.MUST_SAVE
