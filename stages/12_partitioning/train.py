"""Stage 12: balance pipeline stages by measured time or memory instead of by block count.

The model is a tiny Llama of eight decoder layers whose last two MLPs are 16x wider: a uniform
split puts both wide layers on the last stage, which then sets the pace of the whole pipeline.
Every rank profiles the blocks on one micro-batch, the first rank's costs are broadcast, the
exact min-max solver picks the split, and rank 0 prints each stage's predicted cost, GPipe's
predicted step time beside the measured one, then the losses beside the single-device run of
the same model.

Run it:

    torchrun --standalone --nproc_per_node=2 stages/12_partitioning/train.py
    torchrun --standalone --nproc_per_node=2 stages/12_partitioning/train.py --partitioner memory
    torchrun --standalone --nproc_per_node=4 stages/12_partitioning/train.py --partitioner uniform
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP

from goose_core import ParallelContext, PipelineParallel, full_state_dict
from goose_core.partition import PartitionPlan, Partitioner, plan_partition, stage_costs
from goose_core.pipeline import split_model_for
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


def predicted_step(times: PartitionPlan, counts: list[int], num_microbatches: int) -> float:
    """GPipe's step (stage 09): M + p - 1 clock cycles, each as long as the slowest stage's
    forward + backward of one micro-batch, from the blocks' measured seconds ``times``."""
    return (num_microbatches + len(counts) - 1) * max(stage_costs(times.block_costs, counts))


def train(ctx: ParallelContext, spec: TrainSpec, partitioner: Partitioner = "time",
          num_microbatches: int = 4, warmup: int = 1) -> tuple[RunResult, PartitionPlan, float, float]:
    """Train the uneven model split by ``partitioner``; also return the plan, the predicted step
    seconds and the measured ones (the median of the steps after ``warmup``)."""
    model = uneven_model(spec)
    partition = plan(model, spec, ctx.pipeline_parallel_size, partitioner, num_microbatches)
    times = partition if partition.unit == "s" else plan(model, spec, ctx.pipeline_parallel_size, "time",
                                                         num_microbatches)
    # recompute="never" (stage 11): a step is forward + backward, as the prediction.
    model = PipelineParallel(model, ctx, num_microbatches=num_microbatches, recompute="never",
                             partitioner=partition.counts).parallelize()
    optimizer = spec.build_optimizer(model.parameters())
    losses, seconds = [], []
    for batch in spec.batches():
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    measured = statistics.median(seconds[min(warmup, spec.steps - 1):])  # the first pays for allocations
    return (RunResult(losses, full_state_dict(model, ctx)), partition,
            predicted_step(times, partition.counts, num_microbatches), measured)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitioner", choices=["time", "memory", "uniform"], default="time")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    args = parser.parse_args(argv)

    spec = TrainSpec(family=SPEC.family, steps=args.steps, overrides=SPEC.overrides)
    ctx = ParallelContext(pipeline_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    result, partition, predicted, measured = train(ctx, spec, args.partitioner, args.microbatches)
    if ctx.rank == 0:
        m, p = args.microbatches, ctx.pipeline_parallel_size
        print(f"{ctx}: {partition.partitioner} partition {partition.counts} of 8 Llama layers "
              f"(layers {list(WIDE_LAYERS)} {WIDEN}x wider), M={m}")
        print(partition.table())
        print(f"step: predicted (M + p - 1) x slowest stage = {m + p - 1} x {predicted / (m + p - 1) * 1e3:.1f} ms "
              f"= {predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms")
        print(format_beside_reference(result.losses, single_device_run(spec, uneven_model(spec)).losses))
    ctx.destroy()


if __name__ == "__main__":
    main()
