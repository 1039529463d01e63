"""The tables of NOTES.md: bytes a rank holds and sends at each ZeRO stage, measured beside the
formula, and the two ways ZeRO-2 accumulates micro-batches.

    python stages/07_zero2_zero3/measure.py            # llama tiny, bf16 + AdamW, dp = 4
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from goose_core import DataParallel, DistributedOptimizer, ParallelContext, spawn
from goose_core.data import shard_batch
from goose_core.data_parallel import count_items_over, no_sync, reducer_of
from goose_core.distributed import count_traffic
from goose_core.optim import MasterWeights, ZeroCost, norm_kind, unit_numels, zero_cost
from goose_core.testing import TrainSpec

DP = 4
SPEC = TrainSpec(family="llama", precision="bf16", steps=2, batch_size=16)
MICRO = 4


def _storages(tensors: list[torch.Tensor]) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def grads_held(model: nn.Module) -> int:
    """Gradient bytes this rank holds now: full buffers alive, kept shards, ``p.grad``."""
    tensors = [p.grad for p in model.parameters() if p.grad is not None]
    for bucket in reducer_of(model).buckets:
        if getattr(bucket, "allocated", False):  # DataParallel's full buffer (stages 0-2)
            tensors.append(bucket.grad)
        tensors += [t for t in (bucket.shard_grad, getattr(bucket, "full_grad", None)) if torch.is_tensor(t)]
    return _storages(tensors)


def cost_of(model: nn.Module, stage: int) -> ZeroCost:
    """The formula for this rank: DataParallel's buckets at stages 0-2, ZeRO-3's units at 3 (the
    one outside the blocks gathered once, from its forward to its backward)."""
    params = [p for p in SPEC.build_model().parameters()]
    if stage < 3:
        units = unit_numels(params, 25.0, key=norm_kind if stage else (lambda p: None))
        return zero_cost(units, DP, stage, SPEC.model_dtype, tensors=len(params))
    sync = reducer_of(model)
    buckets = [(b, u is not sync.rest) for u in sync.units for b in u.buckets]
    return zero_cost([b.numel for b, _ in buckets], DP, 3, SPEC.model_dtype,
                     regathered=[again for _, again in buckets])


def _step(ctx: ParallelContext, stage: int, micro: int, every: bool) -> dict:
    model = DataParallel(SPEC.build_model(), ctx, zero_stage=max(stage, 1)).parallelize()
    plain = SPEC.build_optimizer(model.parameters())
    optimizer = MasterWeights(plain) if stage == 0 else DistributedOptimizer(plain, ctx)
    batch = shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    n = count_items_over(batch["labels"], ctx.data_parallel_group, ctx.device)
    peak, sent = 0, 0.0
    for i in range(micro):
        with no_sync(model) if i < micro - 1 and not every else nullcontext():
            with count_traffic(ctx) as forward:  # ZeRO-3's gathers; not the loss mean (all-reduce)
                loss = model(**shard_batch(batch, i, micro), num_items_in_batch=n).loss
            with count_traffic(ctx) as backward:
                loss.backward()
            sent += float(forward["dp"] - forward.by_op("dp").get("all_reduce", 0) + backward["dp"])
        peak = max(peak, grads_held(model))
    with count_traffic(ctx) as traffic:
        optimizer.step()
    return {"peak_grads": peak, "sent": sent + float(traffic["dp"]), "cost": cost_of(model, stage)}


def _body() -> dict:
    ctx = ParallelContext(data_parallel_size=DP)
    params = list(SPEC.build_model().parameters())
    out: dict = {"stages": {}, "accumulate": {}}
    for stage in (0, 1, 2, 3):
        got = _step(ctx, stage, 1, False)
        out["stages"][stage] = (got["cost"], got, sum(p.numel() for p in params))
    for every in (False, True):
        out["accumulate"][every] = _step(ctx, 2, MICRO, every)
    return out


def main() -> None:
    ranks = spawn(_body, DP, timeout=600)
    r = ranks[0]
    n = next(iter(r["stages"].values()))[2]
    print(f"llama tiny, bf16 + AdamW, dp={DP}, {n:,} parameters; bytes per parameter on rank 0\n")
    print("| stage | params | grads | masters | optimizer | total | grads measured | "
          "sent over dp, formula | sent over dp, counted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, (cost, got, _) in r["stages"].items():
        sent = got["sent"]
        print(f"| {stage} | {cost.params / n:.3f} | {cost.grads / n:.3f} | {cost.masters / n:.3f} | "
              f"{cost.optimizer / n:.3f} | {cost.held / n:.3f} | {got['peak_grads'] / n:.3f} | "
              f"{float(cost.sent) / n:.3f} | {sent / n:.3f} |")
    print(f"\nZeRO-2, {MICRO} micro-batches a step\n")
    print("| accumulation | gradient bytes held at most (per parameter) | bytes sent over dp a step (per parameter) |")
    print("|---|---|---|")
    for every, got in r["accumulate"].items():
        name = "reduce-scatter every micro-batch" if every else "no_sync, reduce-scatter the last"
        print(f"| {name} | {got['peak_grads'] / n:.3f} | {got['sent'] / n:.3f} |")


if __name__ == "__main__":
    main()
