"""Stage 09: GPipe over processes. Each rank holds one pipeline stage of a transformers model.

Every rank runs the same loop, ``loss = model(**batch).loss; loss.backward()``: the first stage
embeds, the last computes the loss of each micro-batch, activations travel forward and gradients
back by point-to-point messages, and the loss every rank returns is the global batch mean. Rank 0
prints each step's loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/09_pipeline/train.py
    torchrun --standalone --nproc_per_node=2 stages/09_pipeline/train.py --family gpt2 --microbatches 8
    torchrun --standalone --nproc_per_node=4 stages/09_pipeline/train.py --schedule 1f1b \
        --microbatches 8
"""

from __future__ import annotations

import argparse
import os

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.testing import TINY_MODELS, RunResult, TrainSpec, format_beside_reference, reference_run


def train(ctx: ParallelContext, spec: TrainSpec, num_microbatches: int = 4,
          schedule: str = "gpipe") -> RunResult:
    """Train ``spec`` pipelined over ``ctx``'s pipeline group; every rank returns the same result."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe")
    args = parser.parse_args()

    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps)
    result = train(ctx, spec, args.microbatches, args.schedule)
    if ctx.rank == 0:
        name = {"gpipe": "GPipe", "1f1b": "1F1B"}[args.schedule]
        print(f"{ctx}: {name} over {ctx.pipeline_parallel_size} stages, M={args.microbatches}, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
