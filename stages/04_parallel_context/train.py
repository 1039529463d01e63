"""Stage 04: the simplest data parallelism, built from nothing but a ParallelContext and all_reduce.

Every rank holds the whole model, trains on its shard of each global batch, and averages
gradients with one all-reduce per parameter after the backward. Rank 0 prints each step's
global loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/04_parallel_context/train.py
    torchrun --standalone --nproc_per_node=2 stages/04_parallel_context/train.py --family gpt2
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from goose_core import ParallelContext
from goose_core.data import shard_batch
from goose_core.testing import TINY_MODELS, TrainSpec, format_beside_reference, reference_run


def average_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """Turn each rank's shard-mean gradient into the global-batch mean gradient."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=ctx.data_parallel_group)
            p.grad /= ctx.data_parallel_size


def train(ctx: ParallelContext, spec: TrainSpec, model: nn.Module,
          optimizer: torch.optim.Optimizer) -> list[float]:
    """Train ``model`` on this rank's shard of each of ``spec``'s global batches."""
    losses = []
    for step in range(spec.steps):
        batch = shard_batch(spec.batch(step), ctx.data_parallel_rank, ctx.data_parallel_size)
        loss = model(**batch).loss
        loss.backward()
        average_gradients(model, ctx)
        optimizer.step()
        optimizer.zero_grad()
        # Shards are equal-sized, so the global mean is the mean of the shard means.
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=ctx.data_parallel_group)
        losses.append(global_loss.item() / ctx.data_parallel_size)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    ctx = ParallelContext(data_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    model = spec.build_model()
    losses = train(ctx, spec, model, spec.build_optimizer(model.parameters()))
    if ctx.rank == 0:
        print(f"{ctx}: data parallel over {ctx.data_parallel_size} ranks, {args.family}")
        print(format_beside_reference(losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
