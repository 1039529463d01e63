"""Stage 05: DataParallel, gradients averaged in buckets while the backward pass runs.

Every rank holds the whole model and trains on its shard of each global batch; DataParallel's
hooks all-reduce gradients bucket by bucket as they become ready, and ``.loss`` is the global
mean. Rank 0 prints each step's loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/05_data_parallel/train.py
    torchrun --standalone --nproc_per_node=2 stages/05_data_parallel/train.py --family gpt2 --micro-batches 2
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

from goose_core import DataParallel, ParallelContext
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, no_sync
from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, format_beside_reference, reference_run, snapshot


def train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int = 1,
          bucket_size_mb: float = 25.0) -> RunResult:
    """Train ``spec`` data-parallel over ``ctx``'s dp group, each step's forward and backward in
    ``micro_batches`` pieces (gradient accumulation); losses are global means."""
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=bucket_size_mb).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):  # this rank's shard of each global batch
        # The targets of the whole step over every rank: each piece divides its token-loss sum
        # by it, so the pieces add up to the one-device mean, not to a mean of means.
        n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
        step_loss = 0.0
        for i in range(micro_batches):
            last = i == micro_batches - 1
            with nullcontext() if last else no_sync(model):  # communicate in the last backward only
                loss = model(**shard_batch(batch, i, micro_batches), num_items_in_batch=n).loss
                loss.backward()  # full buckets all-reduce while the backward runs
            step_loss = step_loss + loss.detach()  # each piece: its share of the global mean
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(step_loss))
    return RunResult(losses, snapshot(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--bucket-size-mb", type=float, default=25.0)
    args = parser.parse_args()

    ctx = ParallelContext(data_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    result = train(ctx, spec, args.micro_batches, args.bucket_size_mb)
    if ctx.rank == 0:
        print(f"{ctx}: DataParallel over {ctx.data_parallel_size} ranks, {args.family}, "
              f"{args.micro_batches} micro-batch(es) per step")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
