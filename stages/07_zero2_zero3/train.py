"""Stage 07: ZeRO-2 (and ZeRO-3), gradients sharded over data parallelism too.

Stage 06's loop with ``DataParallel(..., zero_stage=2)``: each gradient bucket is reduce-scattered
as the backward finishes it and its full buffer released, so a rank keeps 1/dp of the gradient
(``zero_stage=3`` shards the parameters as well). Rank 0 prints each step's loss beside the
single-device reference, the bytes this rank holds against the formula, and the bytes it sent
over dp in the last step, counted.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/07_zero2_zero3/train.py
    torchrun --standalone --nproc_per_node=2 stages/07_zero2_zero3/train.py --zero-stage 1 --micro-batches 2
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, clip_grad_norm_
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, gathered, no_sync
from goose_core.distributed import Traffic, count_traffic
from goose_core.optim import ZeroCost, zero_cost
from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, format_beside_reference, reference_run, snapshot


def train(ctx: ParallelContext, spec: TrainSpec, zero_stage: int = 2, micro_batches: int = 1,
          bucket_size_mb: float = 25.0, every_micro_batch: bool = False
          ) -> tuple[RunResult, DistributedOptimizer, Traffic]:
    """Train ``spec`` with ZeRO-``zero_stage`` over ``ctx``'s dp group, each step in
    ``micro_batches`` pieces: all but the last under ``no_sync`` (full gradients held until the
    last backward), or, with ``every_micro_batch``, each one reduce-scattered into the shard.
    Returns the run, the optimizer and the dp traffic of the last step's backward and step."""
    model = DataParallel(spec.build_model(), ctx, bucket_size_mb=bucket_size_mb, zero_stage=zero_stage).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    losses = []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):  # this rank's shard of each global batch
        n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
        step_loss = 0.0
        with count_traffic(ctx) as traffic:  # what this step sends (the forward's few bytes too)
            for i in range(micro_batches):
                quiet = i < micro_batches - 1 and not every_micro_batch
                with no_sync(model) if quiet else nullcontext():
                    loss = model(**shard_batch(batch, i, micro_batches), num_items_in_batch=n).loss
                    loss.backward()  # ZeRO-2: each bucket reduce-scattered, its full buffer freed
                step_loss = step_loss + loss.detach()
            if spec.max_grad_norm is not None:
                clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # the norm over the shards
            optimizer.step()  # each rank steps its shard, then the parameters are all-gathered
        optimizer.zero_grad()
        losses.append(float(step_loss))
    with gathered(model):  # ZeRO-3: the whole parameters for the snapshot (collective over dp)
        return RunResult(losses, snapshot(model)), optimizer, traffic


def formula(ctx: ParallelContext, spec: TrainSpec, zero_stage: int, optimizer: DistributedOptimizer) -> ZeroCost:
    """What the rank should hold, from the layout of the optimizer's shards (DataParallel's
    buckets at stages 1-2, ZeRO-3's per-block units at stage 3)."""
    units = [bucket.numel for bucket in optimizer.buckets]
    return zero_cost(units, ctx.data_parallel_size, zero_stage, spec.model_dtype, optimizer=spec.optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--every-micro-batch", action="store_true",
                        help="reduce-scatter every micro-batch instead of no_sync")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--bucket-size-mb", type=float, default=25.0)
    args = parser.parse_args()

    ctx = ParallelContext(data_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps, max_grad_norm=args.max_grad_norm)
    result, optimizer, traffic = train(ctx, spec, args.zero_stage, args.micro_batches, args.bucket_size_mb,
                                       args.every_micro_batch)
    if ctx.rank == 0:
        cost = formula(ctx, spec, args.zero_stage, optimizer)
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
        print(f"{ctx}: ZeRO-{args.zero_stage} over {ctx.data_parallel_size} ranks, {args.family}")
        print(f"  formula: params {cost.params:,} B, grads {cost.grads:,} B, masters {cost.masters:,} B, "
              f"optimizer {cost.optimizer:,} B (held here: {state:,} B)")
        print(f"  counted: {float(traffic['dp']):,.0f} B sent over dp in the last step")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
