"""Stage 11: recompute by virtual dependencies. Same pipeline, far fewer saved activations.

Trains like stage 09 with ``--recompute`` (default ``always``), then measures on every stage the
bytes autograd saves for backward during one step (saved-tensor hooks) in each recompute mode.
Rank 0 prints each step's loss beside the single-device reference, and the memory table.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/11_recompute/train.py
    torchrun --standalone --nproc_per_node=2 stages/11_recompute/train.py --family bloom --microbatches 8
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.pipeline import MODES
from goose_core.testing import TINY_MODELS, RunResult, TrainSpec, format_beside_reference, reference_run


def train(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int, recompute: str,
          schedule: str = "gpipe") -> RunResult:
    """Train ``spec`` pipelined with ``recompute`` (stage 09's loop); every rank returns the same result."""
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=num_microbatches,
                             recompute=recompute, schedule=schedule).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for batch in spec.batches():  # every stage is fed the same whole batch
        loss = model(**batch).loss  # recomputed cells keep only their inputs
        loss.backward()  # ... and recompute their forward just before their backward
        optimizer.step()  # each rank steps the blocks of its stage
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx))


def saved_activation_bytes(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int,
                           recompute: str) -> int:
    """Bytes of tensors autograd saves for backward on this stage during one forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=num_microbatches,
                             recompute=recompute).parallelize()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**spec.batch(0)).loss
    loss.backward()
    return total


def memory_table(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int) -> list[list[int]]:
    """[mode][stage] saved bytes, gathered over the pipeline group (collective)."""
    rows = []
    for mode in MODES:
        mine = saved_activation_bytes(ctx, spec, num_microbatches, mode)
        stages: list[int | None] = [None] * ctx.pipeline_parallel_size
        dist.all_gather_object(stages, mine, group=ctx.pipeline_parallel_group)
        rows.append([int(s or 0) for s in stages])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--recompute", choices=list(MODES), default="always")
    args = parser.parse_args()

    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    result = train(ctx, spec, args.microbatches, args.recompute)
    rows = memory_table(ctx, spec, args.microbatches)
    if ctx.rank == 0:
        print(f"{ctx}: recompute={args.recompute}, M={args.microbatches}, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
        print("saved for backward, bytes per stage:")
        for mode, row in zip(MODES, rows):
            ratio = sum(row) / max(1, sum(rows[-1]))
            print(f"  {mode:>11}: {row}  ({ratio:.3f} x never)")
    ctx.destroy()


if __name__ == "__main__":
    main()
