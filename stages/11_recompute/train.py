"""Stage 11: recompute by virtual dependencies. Same pipeline, far fewer saved activations.

Trains like stage 09 with ``--recompute`` (default ``always``), then measures on every stage the
bytes autograd saves for backward during one step (saved-tensor hooks) and the step's FLOPs
(torch's FLOP counter) in each recompute mode. Rank 0 prints each step's loss beside the
single-device reference, and the two tables.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/11_recompute/train.py
    torchrun --standalone --nproc_per_node=2 stages/11_recompute/train.py --family bloom --microbatches 8
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.pipeline import RECOMPUTE_MODES, LiveActivations
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


def measure_step(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int, recompute: str) -> tuple[int, int]:
    """(bytes, FLOPs) of one step on this stage: the tensors autograd saves for backward alive at
    the end of the forward (saved-tensor hooks; each storage once, parameters not), and the
    FLOPs of the forward and backward (torch's FLOP counter)."""
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=num_microbatches,
                             recompute=recompute).parallelize()
    with FlopCounterMode(display=False) as flops, LiveActivations(model.parameters()) as live:
        loss = model(**spec.batch(0)).loss
        saved = live.bytes
        loss.backward()
    return saved, flops.get_total_flops()


def memory_table(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int) -> list[list[tuple[int, int]]]:
    """[mode][stage] (saved bytes, FLOPs), gathered over the pipeline group (collective)."""
    rows = []
    for mode in RECOMPUTE_MODES:
        mine = measure_step(ctx, spec, num_microbatches, mode)
        stages: list[tuple[int, int] | None] = [None] * ctx.pipeline_parallel_size
        dist.all_gather_object(stages, mine, group=ctx.pipeline_parallel_group)
        rows.append([s or (0, 0) for s in stages])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--recompute", choices=list(RECOMPUTE_MODES), default="always")
    args = parser.parse_args()

    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    result = train(ctx, spec, args.microbatches, args.recompute)
    rows = memory_table(ctx, spec, args.microbatches)
    if ctx.rank == 0:
        print(f"{ctx}: recompute={args.recompute}, M={args.microbatches}, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
        never = rows[RECOMPUTE_MODES.index("never")]
        for k, what in enumerate(("saved for backward, bytes", "FLOPs of the step")):
            print(f"{what} per stage:")
            for mode, row in zip(RECOMPUTE_MODES, rows):
                ratio = sum(s[k] for s in row) / max(1, sum(s[k] for s in never))
                print(f"  {mode:>11}: {[s[k] for s in row]}  ({ratio:.3f} x never)")
    ctx.destroy()


if __name__ == "__main__":
    main()
