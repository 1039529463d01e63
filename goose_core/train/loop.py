"""One training step (forward, backward, clip, optimizer step at the step's learning rate) and
an evaluation pass, at any layout and precision."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import Tensor, nn

from goose_core.amp import GradScaler
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, no_sync, reducer_of
from goose_core.distributed.context import ParallelContext
from goose_core.loss import count_items
from goose_core.optim import clip_grad_norm_

__all__ = ["step", "evaluate", "KILL_ENV", "maybe_die"]

Batch = dict[str, Tensor]

#: For tests: ``"RANK:STEP"`` makes that rank SIGKILL itself after finishing step STEP (1-based),
#: before any checkpoint of that step, as a crashed or preempted node would die.
KILL_ENV = "GOOSE_TRAIN_KILL_AFTER"


def _on(ctx: ParallelContext, batch: Batch) -> Batch:
    """The batch on the rank's device (the data layer serves CPU tensors)."""
    return {key: value.to(ctx.device, non_blocking=True) for key, value in batch.items()}


def _forward_backward(model: nn.Module, shard: Batch, microbatches: int, pipelined: bool,
                      scaler: GradScaler | None) -> Tensor:
    """The step's loss (the global batch's, on every rank), gradients accumulated.

    The pipeline splits its batch into micro-batches itself; without one, ``microbatches > 1``
    accumulates (🤗's convention: every piece divided by the step's target count, summed over
    the dp group, so the gradients add up to the one-device mean; dp communicates on the last)."""
    if pipelined or microbatches == 1:
        loss = model(**shard).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    reducer = reducer_of(model)
    labels = shard["labels"]
    n = count_items(labels) if reducer is None else count_items_over(labels, reducer.group)
    total: Tensor | None = None
    for i in range(microbatches):
        quiet = reducer is not None and i < microbatches - 1
        with no_sync(model) if quiet else nullcontext():
            loss = model(**shard_batch(shard, i, microbatches), num_items_in_batch=n).loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    return total


def step(model: nn.Module, optimizer: Any, ctx: ParallelContext, batch: Batch, lr: float, clip: float,
         microbatches: int, scaler: GradScaler | None = None,
         after_backward: Callable[[nn.Module], None] | None = None) -> tuple[float, float]:
    """Train one step on this dp rank's shard of the global ``batch``.

    Returns:
        (loss, gradient norm before clipping), both the same on every rank.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    shard = _on(ctx, shard_batch(batch, ctx.data_parallel_rank, ctx.data_parallel_size))
    loss = _forward_backward(model, shard, microbatches, ctx.pipeline_parallel_size > 1, scaler)
    if after_backward is not None:
        after_backward(model)
    if scaler is not None:
        scaler.unscale_(optimizer)
    # The norm is wanted in the log anyway; with no clipping the scale is min(1, inf / norm) = 1.
    norm = clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"), ctx)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    return float(loss), float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, ctx: ParallelContext, batches: list[Batch]) -> float:
    """The mean loss over ``batches`` (global batches; each dp rank takes its shard), in eval mode
    (no dropout); the model is back in train mode after."""
    model.eval()
    try:
        total = 0.0
        for batch in batches:
            shard = _on(ctx, shard_batch(batch, ctx.data_parallel_rank, ctx.data_parallel_size))
            total += float(model(**shard).loss)
        return total / len(batches)
    finally:
        model.train()


def maybe_die(ctx: ParallelContext, completed: int) -> None:
    """SIGKILL this rank after step ``completed`` if :data:`KILL_ENV` asks (tests only)."""
    wanted = os.environ.get(KILL_ENV)
    if wanted and wanted == f"{ctx.rank}:{completed}":
        os.kill(os.getpid(), 9)
