"""Stage 11: balance pipeline stages by measured time or memory instead of by block count.

The model is a tiny Llama of eight decoder layers whose last two MLPs are 16x wider: a uniform
split puts both wide layers on the last stage, which then sets the pace of the whole pipeline.
Every rank profiles the blocks on one micro-batch, the first rank's costs are broadcast, the
exact min-max solver picks the split, and after a few steps rank 0 prints each stage's predicted
cost beside the busy time a timeline measured, then the losses beside the single-device run of
the same model.

Run it:

    torchrun --standalone --nproc_per_node=4 stages/11_partitioning/train.py
    torchrun --standalone --nproc_per_node=2 stages/11_partitioning/train.py --partitioner memory
    torchrun --standalone --nproc_per_node=2 stages/11_partitioning/train.py --partitioner uniform
    python stages/11_partitioning/train.py --local 2 --steps 6     # every stage in one process
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.partition import PartitionPlan, Partitioner, plan_partition
from goose_core.pipeline import Timeline, busy_time, local_pipeline, split_model_for, trim_waits
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, snapshot

#: Eight Llama layers; the last two get MLPs WIDEN times wider.
SPEC = TrainSpec(family="llama", steps=4, overrides={"num_hidden_layers": 8})
WIDE_LAYERS = (6, 7)
WIDEN = 16


def uneven_model(spec: TrainSpec, wide: Sequence[int] = WIDE_LAYERS, factor: int = WIDEN) -> PreTrainedModel:
    """``spec``'s Llama with the MLPs of layers ``wide`` made ``factor`` times wider (seeded, so
    every rank and the single-device run build the same model)."""
    model = spec.build_model()
    config = copy.copy(model.config)
    config.intermediate_size *= factor
    for index in wide:
        mlp = LlamaMLP(config)
        # Llama's own init, written out: weights normal(0, initializer_range), biases 0, drawn
        # in fp32 from a generator seeded per layer, then cast, as build_model does.
        generator = torch.Generator().manual_seed(spec.seed + 1 + index)
        with torch.no_grad():
            for linear in (m for m in mlp.modules() if isinstance(m, nn.Linear)):
                linear.weight.normal_(0.0, config.initializer_range, generator=generator)
                if linear.bias is not None:
                    linear.bias.zero_()
        model.model.layers[index].mlp = mlp.to(spec.dtype)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """One step of the loop every stage writes out: forward, backward, step, zero_grad."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def single_device_run(spec: TrainSpec, model: nn.Module) -> RunResult:
    """What ``reference_run`` does, for a model the spec alone cannot build."""
    optimizer = spec.build_optimizer(model.parameters())
    losses = [train_step(model, optimizer, batch) for batch in spec.batches()]
    return RunResult(losses, snapshot(model))


def plan(model: nn.Module, spec: TrainSpec, num_stages: int, partitioner: Partitioner,
         num_microbatches: int) -> PartitionPlan:
    """Profile ``model``'s blocks on one micro-batch of ``spec`` and split them (every rank calls;
    every rank profiles, and the first rank's costs are broadcast, so all agree)."""
    split_model = split_model_for(model)
    microbatch = {"input_ids": spec.batch(0)["input_ids"][: spec.batch_size // num_microbatches]}
    with torch.no_grad():
        sample = split_model.embed(microbatch)
    return plan_partition(len(split_model.blocks), num_stages, partitioner, block_fns=split_model.block_fns(),
                          sample=sample, num_microbatches=num_microbatches)


def train(ctx: ParallelContext, spec: TrainSpec, partitioner: Partitioner = "time",
          num_microbatches: int = 4, warmup: int = 1) -> tuple[RunResult, PartitionPlan, list[float]]:
    """Train the uneven model split by ``partitioner``; also return the plan and the measured
    seconds per micro-batch of each stage (forward + backward, averaged over the steps after
    ``warmup``)."""
    model = uneven_model(spec)
    partition = plan(model, spec, ctx.pipeline_parallel_size, partitioner, num_microbatches)
    timeline = Timeline()
    # recompute="never": the predictions are forward + backward, with no recompute to add.
    model = PipelineParallel(model, ctx, num_microbatches=num_microbatches, recompute="never",
                             partitioner=partition.counts, callbacks=[timeline.callback()]).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses, warmup = [], min(warmup, spec.steps - 1)
    for step in range(spec.steps):
        if step == warmup:
            timeline.clear()  # the first step pays for allocations and thread start-up
        losses.append(train_step(model, optimizer, spec.batch(step)))
    busy = busy_time(trim_waits(timeline.gather(ctx.pipeline_parallel_group)))
    measured = [busy[j] / ((spec.steps - warmup) * num_microbatches) for j in sorted(busy)]
    return RunResult(losses, full_state_dict(model, ctx)), partition, measured


def measure_locally(spec: TrainSpec, num_stages: int, partitioner: Partitioner = "time",
                    num_microbatches: int = 4) -> tuple[PartitionPlan, list[float]]:
    """The same plan and measurement with every stage in this process (``local_pipeline``): the
    stages run one after the other, so no rank waits for a CPU core and the busy times are clean."""
    model = uneven_model(spec)
    partition = plan(model, spec, num_stages, partitioner, num_microbatches)
    timeline = Timeline()
    model = local_pipeline(model, num_stages, num_microbatches, recompute="never",
                           partitioner=partition.counts, callbacks=[timeline.callback()])
    optimizer = spec.build_optimizer(model.parameters())
    for step in range(spec.steps):
        if step == min(1, spec.steps - 1):
            timeline.clear()
        train_step(model, optimizer, spec.batch(step))
    busy = busy_time(timeline.spans)
    return partition, [busy[j] / (max(1, spec.steps - 1) * num_microbatches) for j in sorted(busy)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitioner", choices=["time", "memory", "uniform"], default="time")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    parser.add_argument("--local", type=int, default=0, metavar="STAGES",
                        help="no processes: run STAGES stages in this process and time them")
    args = parser.parse_args(argv)

    spec = TrainSpec(family=SPEC.family, steps=args.steps, overrides=SPEC.overrides)
    if args.local:
        partition, measured = measure_locally(spec, args.local, args.partitioner, args.microbatches)
        print(f"{partition}\nin one process, measured per micro-batch:\n{partition.table(measured, 's')}")
        return
    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    result, partition, measured = train(ctx, spec, args.partitioner, args.microbatches)
    if ctx.rank == 0:
        print(f"{ctx}: {partition.partitioner} partition {partition.counts} of 8 Llama layers "
              f"(layers {list(WIDE_LAYERS)} {WIDEN}x wider), M={args.microbatches}")
        print(partition.table(measured, measured_unit="s"))
        print(format_beside_reference(result.losses, single_device_run(spec, uneven_model(spec)).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
