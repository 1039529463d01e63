"""A model wrapped for its rank's layout, in the supported order: TP, then PP, then DP."""

from __future__ import annotations

from typing import Any

from torch import nn

from goose_core.data_parallel import DataParallel
from goose_core.distributed import ParallelContext
from goose_core.pipeline import PipelineParallel
from goose_core.tensor_parallel import TensorParallel

__all__ = ["at_layout"]


def at_layout(model: nn.Module, ctx: ParallelContext, **pipeline: Any) -> nn.Module:
    """``model`` under every wrapper whose size in ``ctx`` is above 1 (a size of 1 is skipped, so
    the same test body runs at any layout); ``pipeline`` goes to :class:`PipelineParallel`."""
    if ctx.tp_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    if ctx.pp_size > 1:
        model = PipelineParallel(model, ctx, **pipeline).parallelize()
    if ctx.dp_size > 1:
        model = DataParallel(model, ctx).parallelize()
    return model
