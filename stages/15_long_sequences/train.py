"""Stage 15: context parallelism, every sequence split over the cp ranks, equal to one device.

Every rank builds the same seeded model; ``ContextParallel(model, ctx)`` runs its attention as
ring attention over the cp group (each rank holds chunks i and 2C-1-i of every sequence; key and
value blocks travel around the ring) and ``DataParallel`` averages the gradients over dp x cp,
the ranks that hold the same weights. The cp ranks of a dp shard are fed the same batch; goose
keeps each rank's positions. Rank 0 prints each step's loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=2 stages/15_long_sequences/train.py
    torchrun --standalone --nproc_per_node=4 stages/15_long_sequences/train.py --cp 2 --padding left

cp = --cp (default: WORLD_SIZE), dp = WORLD_SIZE / cp.
"""

from __future__ import annotations

import argparse
import os

from torch import nn

from goose_core import ContextParallel, DataParallel, ParallelContext
from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, format_beside_reference, reference_run, snapshot

__all__ = ["build", "train"]


def build(ctx: ParallelContext, spec: TrainSpec, method: str = "ring") -> nn.Module:
    """The seeded single-device model, its attention over the cp ring, its gradients over dp x cp."""
    model = ContextParallel(spec.build_model(), ctx, method=method).parallelize()
    return DataParallel(model, ctx).parallelize()


def train(ctx: ParallelContext, spec: TrainSpec, method: str = "ring") -> RunResult:
    """Train ``spec`` context-parallel; return the global-mean losses and the parameters."""
    model = build(ctx, spec, method)
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):  # cp peers: the same dp shard
        loss = model(**batch).loss  # this rank's slice of every sequence; .loss: the global mean
        loss.backward()  # dK, dV travel the ring; gradients averaged over dp x cp
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, snapshot(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cp", type=int, default=None, help="context-parallel size (default: WORLD_SIZE)")
    parser.add_argument("--padding", choices=["right", "left"], default=None)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp = args.cp or world
    ctx = ParallelContext(data_parallel_size=world // cp, context_parallel_size=cp)
    spec = TrainSpec(family=args.family, steps=args.steps, padding=args.padding)
    result = train(ctx, spec)
    if ctx.rank == 0:
        print(f"{ctx}: ring attention over {cp} ranks, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
