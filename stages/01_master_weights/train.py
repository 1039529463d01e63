"""Stage 01: bf16 training the Megatron way, beside the single-device bf16 recipe.

The model is cast to bf16 (weights and activations). Gradients are summed in fp32: DataParallel's
buckets are fp32 for a bf16 model and each micro-batch's gradient is added in as it comes; the
optimizer steps fp32 master weights: ``MasterWeights`` (a plain optimizer, one copy per rank) or
ZeRO-1's ``DistributedOptimizer`` (masters and Adam moments for this rank's shard only), and the
bf16 parameters follow the masters after every step. Every rank applies the wrappers its layout
needs (tp, pp, dp > 1) and prints nothing; rank 0 prints the losses beside the single-device bf16
recipe and the fp32 run, and the bytes per parameter on this rank against the formula.

Run it:

    torchrun --standalone --nproc_per_node=2 stages/01_master_weights/train.py --dp 2
    torchrun --standalone --nproc_per_node=8 stages/01_master_weights/train.py --tp 2 --pp 2 --dp 2 --zero
    torchrun --standalone --nproc_per_node=2 stages/01_master_weights/train.py --dp 2 --reduce-dtype bf16
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch import nn

from goose_core import (DataParallel, DistributedOptimizer, ParallelContext, PipelineParallel, TensorParallel,
                        clip_grad_norm_, full_state_dict)
from goose_core.data_parallel import reducer_of
from goose_core.optim import MasterWeights
from goose_core.testing import RunResult, TrainSpec, format_beside_reference, reference_run

#: The GQA Llama in bf16 with fp32 masters, AdamW with clipping.
SPEC = TrainSpec(family="llama", steps=4, max_grad_norm=1.0, precision="bf16")


def parallelize(model: nn.Module, ctx: ParallelContext, num_microbatches: int = 2,
                reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Every wrapper ``ctx``'s layout asks for, in the recommended order (TP, PP, DP)."""
    if ctx.tensor_parallel_size > 1:
        model = TensorParallel(model, ctx).parallelize()
    if ctx.pipeline_parallel_size > 1:
        model = PipelineParallel(model, ctx, num_microbatches=num_microbatches).parallelize()
    if ctx.data_parallel_size > 1:
        model = DataParallel(model, ctx, reduce_dtype=reduce_dtype).parallelize()
    return model


def train(ctx: ParallelContext, spec: TrainSpec, zero: bool = False, num_microbatches: int = 2,
          reduce_dtype: torch.dtype | None = None) -> tuple[RunResult, nn.Module, torch.optim.Optimizer]:
    """Train ``spec`` (bf16 model) on ``ctx``'s layout with fp32 masters: ZeRO-1's shards if
    ``zero``, else :class:`MasterWeights`. Returns the run (gathered bf16 parameters), the model
    and the optimizer."""
    model = parallelize(spec.build_model(), ctx, num_microbatches, reduce_dtype)
    plain = spec.build_optimizer(model.parameters())
    optimizer = DistributedOptimizer(plain, ctx) if zero else MasterWeights(plain)
    losses = []
    for batch in spec.batches(ctx.data_parallel_rank, ctx.data_parallel_size):
        loss = model(**batch).loss  # bf16 activations; the loss itself in fp32
        loss.backward()  # bf16 gradients, added into fp32 (masters' grads or DataParallel's buckets)
        if spec.max_grad_norm is not None:
            clip_grad_norm_(model.parameters(), spec.max_grad_norm, ctx)  # the fp32 gradients' norm
        optimizer.step()  # fp32 masters step; the bf16 parameters follow (all-gathered under ZeRO-1)
        optimizer.zero_grad()
        losses.append(loss.item())
    return RunResult(losses, full_state_dict(model, ctx)), model, optimizer


def bytes_per_parameter(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this rank holds per parameter of its model piece, by kind: the bf16 weights, the
    gradient buffers (DataParallel's buckets, else the masters' fp32 grads), and the optimizer's
    masters and state. Each storage is counted once."""
    params = list({id(p): p for p in model.parameters()}.values())
    n = sum(p.numel() for p in params)
    seen: set[int] = set()

    def size(tensors: list[torch.Tensor]) -> int:
        fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                 if t.untyped_storage().data_ptr() not in seen}
        seen.update(fresh)
        return sum(fresh.values())

    reducer = reducer_of(model)
    weights = size(params)
    if reducer is not None:
        grads = size([b.grad for b in reducer.buckets])
    else:
        grads = size([m.grad for m in optimizer.param_groups[0]["params"] if m.grad is not None])
    masters = [m for g in optimizer.param_groups for m in g["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": weights / n, "grads": grads / n, "masters": size(masters) / n,
            "moments": size(state) / n, "params": float(n)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for axis in ("tp", "pp", "dp"):
        parser.add_argument(f"--{axis}", type=int, default=1)
    parser.add_argument("--zero", action="store_true", help="ZeRO-1: fp32 master shards per dp rank")
    parser.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=SPEC.steps)
    args = parser.parse_args(argv)

    ctx = ParallelContext(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                          data_parallel_size=args.dp)
    spec = replace(SPEC, steps=args.steps)
    reduce_dtype = torch.bfloat16 if args.reduce_dtype == "bf16" else None
    result, model, optimizer = train(ctx, spec, args.zero, reduce_dtype=reduce_dtype)
    held = bytes_per_parameter(model, optimizer)
    masters = {m.dtype for g in optimizer.param_groups for m in g["params"]}
    if ctx.rank == 0:
        kind = "ZeRO-1 master shards" if args.zero else "MasterWeights"
        print(f"{ctx}: bf16 model, {kind} in {sorted(str(d) for d in masters)}, "
              f"gradients reduced in {args.reduce_dtype}")
        print(format_beside_reference(result.losses, reference_run(spec).losses))
        fp32 = reference_run(replace(spec, precision="full", dtype=torch.float32)).losses
        print(f"fp32 run's losses: {' '.join(f'{x:.4f}' for x in fp32)}")
        dp = args.dp if args.zero else 1
        print(f"bytes per parameter on rank 0: weights {held['weights']:.2f} + grads {held['grads']:.2f} "
              f"+ masters {held['masters']:.2f} + moments {held['moments']:.2f}; "
              f"formula 2 + 4 + 12/{dp} = {6 + 12 / dp:.2f}")
    ctx.destroy()


if __name__ == "__main__":
    main()
