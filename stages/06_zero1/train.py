"""Stage 06: ZeRO-1, each data-parallel rank keeps optimizer state for its shard only.

DataParallel's hooks reduce-scatter gradient buckets during the backward pass; the
DistributedOptimizer clips the global gradient norm, steps its shard and all-gathers the
parameters. Rank 0 prints each step's loss beside the single-device reference and the
optimizer-state bytes this rank holds.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/06_zero1/train.py
    torchrun --standalone --nproc_per_node=2 stages/06_zero1/train.py --family gpt2 --micro-batches 2 --max-grad-norm 1.0
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, no_sync
from goose_core.loss import count_items
from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, format_beside_reference, reference_run, snapshot


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (moments, momentum, step counters) held by this rank."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def train(ctx: ParallelContext, spec: TrainSpec, micro_batches: int = 1, bucket_size_mb: float = 25.0,
          data_parallel: bool = True) -> tuple[RunResult, DistributedOptimizer]:
    """Train ``spec`` with ZeRO-1 over ``ctx``'s dp group (and DataParallel's overlapped hooks),
    each step's forward and backward in ``micro_batches`` pieces.

    Without ``data_parallel`` the optimizer reduce-scatters the local gradients itself at
    ``step()``, and losses are averaged over the group here.
    """
    model = spec.build_model()
    if data_parallel:
        model = DataParallel(model, ctx, bucket_size_mb=bucket_size_mb).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx, bucket_size_mb=bucket_size_mb)
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):  # this rank's shard of each global batch
        # The denominator of every piece: under DataParallel the targets of the whole step over
        # every rank (stage 05); without it this shard's own, and the optimizer averages the ranks.
        labels = batch["labels"]
        n = count_items_over(labels, ctx.data_parallel_group, ctx.device) if data_parallel else count_items(labels)
        step_loss = 0.0
        for i in range(micro_batches):
            quiet = data_parallel and i < micro_batches - 1
            with no_sync(model) if quiet else nullcontext():  # reduce-scatter in the last backward only
                loss = model(**shard_batch(batch, i, micro_batches), num_items_in_batch=n).loss
                loss.backward()
            step_loss = step_loss + loss.detach()
        if spec.max_grad_norm is not None:
            clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # the global norm, from shards
        optimizer.step()  # each rank steps its shard, then the parameters are all-gathered
        optimizer.zero_grad()
        losses.append(float(step_loss))
    if not data_parallel:
        mean = torch.tensor(losses, dtype=torch.float64)  # a Python float's own precision
        torch.distributed.all_reduce(mean, group=ctx.data_parallel_group)
        losses = (mean / ctx.data_parallel_size).tolist()
    return RunResult(losses, snapshot(model)), optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bucket-size-mb", type=float, default=25.0)
    args = parser.parse_args()

    ctx = ParallelContext(data_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps, max_grad_norm=args.max_grad_norm)
    result, optimizer = train(ctx, spec, args.micro_batches, args.bucket_size_mb)
    if ctx.rank == 0:
        print(f"{ctx}: ZeRO-1 over {ctx.data_parallel_size} ranks, {args.family}, "
              f"{state_bytes(optimizer):,} bytes of optimizer state on this rank")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
