"""Stage 10: streams and overlap. The stage 09 pipeline, then a sleep-calibrated measurement.

First trains pipelined (on GPUs the same code queues compute on the default stream and copies
on copy streams; on CPU the stand-in streams do nothing), printing each step's loss beside the
single-device reference on rank 0. Then replaces the model by stages that sleep a fixed time per
forward and backward, and prints the measured step time beside GPipe's ideal
(M + p - 1) * (t_f + t_b): what is left over is what transfers and bookkeeping failed to hide.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/10_streams/train.py
    torchrun --standalone --nproc_per_node=4 stages/10_streams/train.py --microbatches 8 --t-forward 0.01
"""

from __future__ import annotations

import argparse
import os

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.pipeline import SleepPipeline, ideal_gpipe_time
from goose_core.testing import TINY_MODELS, RunResult, TrainSpec, format_beside_reference, reference_run


def train(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int = 4,
          schedule: str = "gpipe") -> RunResult:
    """Train ``spec`` pipelined (stage 09's loop, unchanged); every rank returns the same result."""
    model = PipelineParallel(spec.build_model(), ctx, num_microbatches=num_microbatches,
                             schedule=schedule).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for batch in spec.batches():  # every stage is fed the same whole batch
        loss = model(**batch).loss  # micro-batches flow forward; every stage gets the batch mean
        loss.backward()  # the whole backward schedule, across ranks (1F1B: ran in the forward)
        optimizer.step()  # each rank steps the blocks of its stage
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx))


def emulated_step_time(ctx: ParallelContext, num_microbatches: int, t_forward: float,
                       t_backward: float, repeats: int = 3) -> float:
    """The fastest of ``repeats`` sleep-calibrated steps (after one warm-up), in seconds."""
    pipeline = SleepPipeline(ctx, num_microbatches, t_forward, t_backward)
    pipeline.step()
    return min(pipeline.step() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--t-forward", type=float, default=0.02)
    parser.add_argument("--t-backward", type=float, default=0.04)
    args = parser.parse_args()

    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    result = train(ctx, spec, args.microbatches)
    measured = emulated_step_time(ctx, args.microbatches, args.t_forward, args.t_backward)
    if ctx.rank == 0:
        p, m = ctx.pipeline_parallel_size, args.microbatches
        ideal = ideal_gpipe_time(m, p, args.t_forward, args.t_backward)
        print(f"{ctx}: pipeline over {p} stages, M={m}, streams on {ctx.device.type}, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
        print(f"sleep-calibrated step: {measured * 1e3:.1f} ms, ideal GPipe {ideal * 1e3:.1f} ms "
              f"({measured / ideal:.3f} x ideal; one cell at a time would take "
              f"{m * p * (args.t_forward + args.t_backward) * 1e3:.0f} ms)")
    ctx.destroy()


if __name__ == "__main__":
    main()
