"""The random streams a checkpoint carries: CPU, CUDA, and the tensor-parallel split stream.

Each rank saves its own states (``rng/<rank>/...``). Loading at the saved layout gives every rank
back its own: dropout then draws the masks the uninterrupted run would have drawn. At another
layout no saved rank corresponds to a new one, so every rank takes saved rank 0's CPU and CUDA
states (the replicated stream must stay equal over each tp group, and this keeps it so), and
the split stream of the saved rank with the same tp rank when the tp size is unchanged; with a
new tp size the split streams stay as freshly seeded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from goose_core.distributed.context import ParallelContext

__all__ = ["capture", "wanted", "restore"]


def _tracker(model: nn.Module) -> Any:
    return getattr(model, "goose_rng_tracker", None)  # set by TensorParallel (rng_tracker())


def capture(model: nn.Module, ctx: ParallelContext) -> dict[str, Tensor]:
    """This rank's generator states, by key (``cpu``, ``cuda``, ``tp``).

    Raises:
        ValueError: inside a tensor-parallel region (a forward is running).
    """
    states = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(ctx.device)
    tracker = _tracker(model)
    if tracker is not None:
        if tracker.in_split_region:
            raise ValueError("save_checkpoint was called inside a tensor-parallel region; save between steps")
        states["tp"] = tracker._split.clone()  # the split stream's position (RNGTracker keeps it)
    return states


def wanted(layout: dict[str, Any], ctx: ParallelContext) -> dict[str, int]:
    """For each key, the saved rank whose state this rank takes (see the module docstring)."""
    mine = (ctx.tensor_parallel_size, ctx.pipeline_parallel_size, ctx.data_parallel_size)
    if (layout["tp"], layout["pp"], layout["dp"]) == mine:
        return {key: ctx.rank for key in layout["rng_keys"]}
    chosen = {key: 0 for key in layout["rng_keys"] if key != "tp"}
    if "tp" in layout["rng_keys"] and layout["tp"] == ctx.tensor_parallel_size:
        chosen["tp"] = layout["coords"].index([ctx.tensor_parallel_rank, 0, 0])  # [tp, pp, dp]
    return chosen


def restore(model: nn.Module, ctx: ParallelContext, states: dict[str, Tensor]) -> None:
    """Set the generators from ``states`` (keys as :func:`capture`; missing ones are left)."""
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], ctx.device)
    tracker = _tracker(model)
    if "tp" in states and tracker is not None:
        tracker._split = states["tp"].clone()
