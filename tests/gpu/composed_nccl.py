"""One rank under torchrun with NCCL: TensorParallel, PipelineParallel, DataParallel, ZeRO-1 and
clipping, the model on ``ctx.device``, equal to the plain run on that GPU.

Run by ``test_composed_nccl.py`` as ``torchrun --standalone --nproc_per_node=1`` this file. Every
axis has size 1, so each wrapper's collectives run on one-rank NCCL groups: what a GPU adds is
NCCL itself, CUDA tensors through every collective and state dict, and the device the context
chose. The models train in float64 (NCCL reduces it; TF32 never applies), so the tolerance is
``PARALLEL``. Prints one ``equals the plain run`` line per model; any mismatch raises.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, full_state_dict)
from goose_core.testing import PARALLEL, RunResult, TrainSpec, assert_matches_reference, snapshot, train_loop

#: GPT-2's tied embedding (first and last stage: one partition here) under SGD, whose steps keep
#: a wrong gradient scale visible; the GQA Llama under AdamW. Both clip at a norm they exceed.
SPECS = (TrainSpec(family="gpt2", steps=3, optimizer="sgd", max_grad_norm=0.5),
         TrainSpec(family="llama", steps=3, max_grad_norm=0.5))


def _batches(spec: TrainSpec, device: torch.device):  # type: ignore[no-untyped-def]
    for batch in spec.batches():
        yield {k: v.to(device) for k, v in batch.items()}


def _on(model: nn.Module, device: torch.device) -> None:
    where = {str(p.device) for p in model.parameters()} | {str(p.grad.device) for p in model.parameters()
                                                          if p.grad is not None}
    if where != {str(device)}:
        raise AssertionError(f"parameters or gradients on {sorted(where)}, expected only {device}")


def composed(ctx: ParallelContext, spec: TrainSpec) -> RunResult:
    model = spec.build_model().to(ctx.device)
    model = TensorParallel(model, ctx).parallelize()
    model = PipelineParallel(model, ctx, num_microbatches=2).parallelize()
    model = DataParallel(model, ctx).parallelize()
    optimizer = DistributedOptimizer(spec.build_optimizer(model.parameters()), ctx)
    clip = lambda: clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # noqa: E731
    losses = train_loop(model, optimizer, _batches(spec, ctx.device), clip)
    _on(model, ctx.device)
    return RunResult(losses, full_state_dict(model, ctx))


def plain(spec: TrainSpec, device: torch.device) -> RunResult:
    model = spec.build_model().to(device)
    optimizer = spec.build_optimizer(model.parameters())
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)  # noqa: E731
    return RunResult(train_loop(model, optimizer, _batches(spec, device), clip), snapshot(model))


def main(argv: list[str]) -> None:
    # --cpu: the same on gloo and the CPU, to check this script on a machine without a GPU.
    ctx = ParallelContext(backend="gloo") if "--cpu" in argv else ParallelContext()  # torchrun's environment
    want = ("gloo", torch.device("cpu")) if "--cpu" in argv else ("nccl", torch.device("cuda", 0))
    if (ctx.backend, ctx.device) != want:
        raise SystemExit(f"expected {want[0]} on {want[1]}, the context chose {ctx.backend} on {ctx.device}")
    for spec in SPECS:
        got, want = composed(ctx, spec), plain(spec, ctx.device)
        assert_matches_reference(got, want, PARALLEL)
        print(f"{spec.family}: tp x pp x dp + ZeRO-1 + clipping on {ctx.device} over {ctx.backend} "
              f"equals the plain run: losses {got.losses}", flush=True)
    ctx.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
