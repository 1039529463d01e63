"""Stage 02: DataParallel, gradients averaged in buckets while the backward pass runs.

Every rank holds the whole model and trains on its shard of each global batch; DataParallel's
hooks all-reduce gradients bucket by bucket as they become ready, and ``.loss`` is the global
mean. Rank 0 prints each step's loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/02_data_parallel/train.py
    torchrun --standalone --nproc_per_node=2 stages/02_data_parallel/train.py --family gpt2 --micro-batches 2
"""

from __future__ import annotations

import argparse
import functools
import os

from goose_core import DataParallel, ParallelContext
from goose_core.data_parallel import no_sync
from goose_core.testing import FAMILIES, RunResult, TrainSpec, format_beside_reference, reference_run, snapshot, train_loop


def train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int = 1,
          bucket_size_mb: float = 25.0) -> RunResult:
    """Train ``spec`` data-parallel over ``ctx``'s dp group; losses are global means."""
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=bucket_size_mb).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = train_loop(model, optimizer, spec.batches(ctx.dp_rank, ctx.dp_size),
                        micro_batches=micro_batches, no_sync=functools.partial(no_sync, model))
    return RunResult(losses, snapshot(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
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
