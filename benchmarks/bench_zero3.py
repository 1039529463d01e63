"""goose ZeRO-2 (and ZeRO-3) beside torch FSDP2 (``fully_shard``): step time, paired, and the bytes
each rank holds at the end of the backward beside plain data parallelism, at dp = 4 on gloo.

Pairs: ZeRO-2 with ``fully_shard(reshard_after_forward=False)`` (parameters stay whole between
the forward and the backward, gradients sharded), ZeRO-3 with ``reshard_after_forward=True``
(parameters sharded between uses; run where ``goose_core.data_parallel.zero3`` exists), and
ZeRO-2 with goose's own ZeRO-1 (what releasing the buffers costs in time).

"Held" is the sum of the tensor storages of the parameters, gradients (buffers, shards and
``p.grad``), master copies and optimizer state a rank holds once the backward has finished, each
storage counted once (FSDP2's DTensors by their local shard); activations and the transient
gather buffers are not in it. tests/test_zero_memory.py proves goose's figures equal
:func:`goose_core.optim.zero_cost` to the byte; this benchmark prints both beside FSDP2's.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.bench_data_parallel import ROUNDS, SPEC, STEPS, timed_steps
from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import DataParallel, DistributedOptimizer, ParallelContext, spawn
from goose_core.data import shard_batch
from goose_core.data_parallel import reducer_of
from goose_core.optim import norm_kind, unit_numels, zero_cost

WORLD = 4
ZERO3 = importlib.util.find_spec("goose_core.data_parallel.zero3") is not None
Built = tuple[nn.Module, torch.optim.Optimizer]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind parameters, gradients, masters and optimizer state."""
    tensors = [_local(p) for p in model.parameters()] + [_local(p.grad) for p in model.parameters()
                                                         if p.grad is not None]
    reducer = reducer_of(model)
    for bucket in reducer.buckets if reducer is not None else []:
        if getattr(bucket, "allocated", False):  # a full gradient buffer alive (DP, ZeRO-1)
            tensors.append(bucket.grad)
        for name in ("shard_grad", "param_shard", "full", "full_grad"):  # ZeRO-2/3 shards, gathers
            if torch.is_tensor(t := getattr(bucket, name, None)):
                tensors.append(t)
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors += list(getattr(optimizer, "shards", []) or getattr(optimizer, "masters", {}).values())
    tensors += [_local(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _goose(ctx: ParallelContext, zero_stage: int) -> Built:
    """Stage 0: DataParallel and a plain optimizer; 1-3: DistributedOptimizer on top."""
    model = DataParallel(SPEC.build_model(), ctx, zero_stage=max(zero_stage, 1)).parallelize()
    optimizer = SPEC.build_optimizer(model.parameters())
    return model, optimizer if zero_stage == 0 else DistributedOptimizer(optimizer, ctx)


def _fsdp2(ctx: ParallelContext, reshard_after_forward: bool) -> Built:
    """torch's FSDP2: each GPT-2 block a unit, then the root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(ctx.dp_group, "cpu")
    model = SPEC.build_model()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model, SPEC.build_optimizer(model.parameters())


def _after_backward(ctx: ParallelContext, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Held bytes at the end of the second step's backward (the first step made the state)."""
    for step in range(2):
        model(**shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)).loss.backward()
        if step == 1:
            held = held_bytes(model, optimizer)
        optimizer.step()
        optimizer.zero_grad()
    return held


def _body() -> dict[str, Any]:
    ctx = ParallelContext(data_parallel_size=WORLD)
    builds: dict[str, Callable[[], Built]] = {
        "dp": lambda: _goose(ctx, 0), "zero1": lambda: _goose(ctx, 1), "zero2": lambda: _goose(ctx, 2),
        "fsdp2_keep": lambda: _fsdp2(ctx, False), "fsdp2_reshard": lambda: _fsdp2(ctx, True)}
    if ZERO3:
        builds["zero3"] = lambda: _goose(ctx, 3)
    built = {name: build() for name, build in builds.items()}
    held = {name: _after_backward(ctx, *b) for name, b in built.items()}

    def pair(a: str, b: str) -> Pairs:
        return alternate(lambda: timed_steps(ctx, *built[a], STEPS), lambda: timed_steps(ctx, *built[b], STEPS),
                         ROUNDS)

    pairs = {("zero2", "fsdp2_keep"): pair("zero2", "fsdp2_keep"), ("zero2", "zero1"): pair("zero2", "zero1")}
    if ZERO3:
        pairs[("zero3", "fsdp2_reshard")] = pair("zero3", "fsdp2_reshard")
    params = [p for p in SPEC.build_model().parameters()]
    units = unit_numels(params, 25.0, key=norm_kind)
    formula = {f"zero{s}": zero_cost(units, WORLD, s, SPEC.model_dtype).held for s in (1, 2)}
    formula["dp"] = zero_cost(unit_numels(params, 25.0), WORLD, 0, SPEC.model_dtype, tensors=len(params)).held
    if ZERO3:  # ZeRO-3's units are its blocks and the rest, not DataParallel's buckets
        sync = reducer_of(built["zero3"][0])
        formula["zero3"] = zero_cost([b.numel for u in sync.units for b in u.buckets], WORLD, 3,
                                     SPEC.model_dtype).held
    return {"held": held, "pairs": pairs, "formula": formula}


PEERS = {"fsdp2_keep": "torch FSDP2 fully_shard(reshard_after_forward=False)",
         "fsdp2_reshard": "torch FSDP2 fully_shard(reshard_after_forward=True)",
         "zero1": "goose ZeRO-1", "dp": "goose DataParallel + AdamW (no ZeRO)"}


def run() -> list[Record]:
    ranks = spawn(_body, WORLD, timeout=900)
    what = f"gpt2 3.2M params fp32, AdamW, dp={WORLD}"
    records = [Record.timed("zero2_zero3", f"step time {a} vs {b}, {what}, {ROUNDS} rounds x {STEPS} steps",
                            pairs, PEERS[b]) for (a, b), pairs in ranks[0]["pairs"].items()]
    fullest = {name: max(r["held"][name] for r in ranks) for name in ranks[0]["held"]}
    for name in [n for n in ("zero1", "zero2", "zero3") if n in fullest]:
        records.append(Record.count("zero2_zero3", f"bytes held after backward, {name} vs DP, fullest rank, {what}",
                                    fullest[name], fullest["dp"], PEERS["dp"], "B"))
    for name, peer in (("zero2", "fsdp2_keep"), ("zero3", "fsdp2_reshard")):
        if name in fullest:
            records.append(Record.count("zero2_zero3", f"bytes held after backward, {name} vs FSDP2, fullest rank, "
                                        f"{what}", fullest[name], fullest[peer], PEERS[peer], "B"))
    for name, bytes_ in ranks[0]["formula"].items():
        records.append(Record.count("zero2_zero3", f"bytes held after backward, {name}, measured vs formula, "
                                    f"fullest rank, {what}", fullest[name], bytes_, "goose_core.optim.zero_cost", "B"))
    return records



if __name__ == "__main__":  # print without appending to results.json (make bench appends)
    for record in run():
        print(f"{record.metric}: goose {record.goose:.6g} {record.unit}, {record.peer_name} {record.peer:.6g}, "
              f"ratio {record.ratio:.3f} [{record.low:.3f}, {record.high:.3f}] ({record.pairs} pairs)")
