"""Stage 16: ExpertParallel, a mixture-of-experts model's experts spread over the data-parallel ranks.

Each rank of an expert-parallel group of E ranks keeps num_experts / E experts of every MoE
layer; the family's own router picks each token's experts, and all-to-all takes the token there
and back. Dense weights stay data-parallel; experts' gradients are averaged over the ranks that
hold the same experts. Rank 0 prints each step's loss beside the single-device run, and the
rows its experts computed (the load the router gave them).

Run it:

    torchrun --standalone --nproc_per_node=2 stages/16_expert_parallel/train.py
    torchrun --standalone --nproc_per_node=4 stages/16_expert_parallel/train.py --ep 2
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoConfig

from goose_core import DataParallel, ParallelContext
from goose_core.expert_parallel import ExpertParallel, expert_load
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, seeded_model, snapshot

# A tiny Mixtral: 4 experts, top-2, its auxiliary router loss on (exact over dp: see router_loss.py).
MIXTRAL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
               output_router_logits=True, router_aux_loss_coef=0.5)


def build(spec: TrainSpec) -> torch.nn.Module:
    config = AutoConfig.for_model("mixtral", experts_implementation="eager", **MIXTRAL)  # any dtype
    return seeded_model(config, spec.seed, spec.dtype)


def train(ctx: ParallelContext, spec: TrainSpec) -> tuple[RunResult, list[dict[str, list[int]]]]:
    """Train ``spec``'s batches on the tiny Mixtral, experts spread over ``ctx``'s EP group and
    dense weights data-parallel; returns the run and this rank's expert load at every step."""
    model = ExpertParallel(build(spec), ctx).parallelize()  # first: the later wrappers read its marks
    model = DataParallel(model, ctx).parallelize()           # experts' buckets reduce over their group
    optimizer = spec.build_optimizer(model.parameters())
    losses, loads = [], []
    for batch in spec.batches(ctx.dp_rank, ctx.dp_size):
        loss = model(**batch).loss  # each MoE layer: route, all-to-all, local experts, all-to-all back
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        loads.append(expert_load(model))  # rows per local expert, per layer, this step
    return RunResult(losses, snapshot(model)), loads


def reference(spec: TrainSpec) -> list[float]:
    """The same loop on one device, whole batches."""
    model = build(spec)
    optimizer = spec.build_optimizer(model.parameters())
    losses = []
    for step in range(spec.steps):
        loss = model(**spec.batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: every rank)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = ParallelContext(data_parallel_size=world, expert_parallel_size=args.ep or world)
    spec = TrainSpec(steps=args.steps, batch_size=4 * world, padding="right")
    result, loads = train(ctx, spec)
    if ctx.rank == 0:
        print(f"{ctx}: ExpertParallel over {ctx.experts.size} ranks, tiny Mixtral (4 experts, top-2)")
        print(format_beside_reference(result.losses, reference(spec)))
        for step, load in enumerate(loads):
            print(f"step {step}: rows per local expert on rank 0: {load}")
    ctx.destroy()


if __name__ == "__main__":
    main()
