"""Stage 08: Megatron-style tensor parallelism of an HF causal LM, equal to the single-device run.

Every rank builds the same seeded model, ``TensorParallel(model, ctx).parallelize()`` cuts each
block's weights across the tp group (column-parallel then row-parallel: one all-reduce forward,
one backward per attention and per MLP), the vocabulary is split over the embedding, the LM head
and the loss. Rank 0 prints each step's loss beside the single-device reference.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/08_tensor_parallel/train.py
    torchrun --standalone --nproc_per_node=2 stages/08_tensor_parallel/train.py --family gpt2
    torchrun --standalone --nproc_per_node=4 stages/08_tensor_parallel/train.py --family bloom --dropout 0.1

tp = WORLD_SIZE. With dropout on, no single-device run can match (the masks of split activations
differ by design), so the reference column is then only a guide.
"""

from __future__ import annotations

import argparse
import os

from torch import nn

from goose_core import ParallelContext, TensorParallel, full_state_dict
from goose_core.testing import RunResult, TINY_MODELS, TrainSpec, format_beside_reference, reference_run

__all__ = ["build", "train"]


def build(ctx: ParallelContext, spec: TrainSpec) -> nn.Module:
    """The seeded single-device model, then sharded over ``ctx``'s tensor-parallel group."""
    return TensorParallel(spec.build_model(), ctx).parallelize()


def train(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    """Train ``spec`` tensor-parallel; return the losses and the gathered HF-named parameters."""
    model = build(ctx, spec)
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for step in range(spec.steps):
        loss = model(**spec.batch(step)).loss  # every tp rank: the whole batch, the same loss
        loss.backward()  # one all-reduce per attention and per MLP on the way back
        optimizer.step()  # each rank steps its own shards
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(TINY_MODELS), default="llama")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()

    ctx = ParallelContext(tensor_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    spec = TrainSpec(family=args.family, steps=args.steps, dropout=args.dropout)
    result = train(ctx, spec)
    if ctx.rank == 0:
        print(f"{ctx}: tensor parallel over {ctx.tensor_parallel_size} ranks, {args.family}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
