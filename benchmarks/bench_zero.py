"""goose ZeRO-1 beside torch's ZeroRedundancyOptimizer: step time (paired) and optimizer-state bytes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from benchmarks.bench_data_parallel import ROUNDS, SPEC, STEPS, WORLD, paired_steps
from benchmarks.results import Record
from goose_core import DataParallel, DistributedOptimizer, ParallelContext, spawn


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors this rank holds."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def _body() -> dict[str, Any]:
    ctx = ParallelContext(data_parallel_size=WORLD)
    built: dict[str, torch.optim.Optimizer] = {}

    def goose() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DataParallel(SPEC.build_model(), ctx).parallelize()
        built["goose"] = DistributedOptimizer(SPEC.build_optimizer(model.parameters()), ctx)
        return model, built["goose"]

    def zero_redundancy() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DistributedDataParallel(SPEC.build_model(), process_group=ctx.dp_group)
        built["peer"] = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, process_group=ctx.dp_group,
                                                lr=SPEC.lr, weight_decay=SPEC.weight_decay)
        return model, built["peer"]

    pairs = paired_steps(ctx, goose, zero_redundancy)
    params = list(SPEC.build_model().parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    return {"pairs": pairs, "goose_bytes": state_bytes(built["goose"]),
            "peer_bytes": state_bytes(built["peer"].optim), "ideal_bytes": 2 * total / WORLD}


def run() -> list[Record]:
    ranks = spawn(_body, WORLD, timeout=600)
    r = ranks[0]
    worst_goose = max(x["goose_bytes"] for x in ranks)
    worst_peer = max(x["peer_bytes"] for x in ranks)
    what = f"gpt2 3.2M params fp32, AdamW, dp={WORLD}"
    return [
        Record.timed("zero1", f"step time, {what}, {ROUNDS} rounds x {STEPS} steps", r["pairs"],
                     "torch ZeroRedundancyOptimizer (+DDP)"),
        Record.count("zero1", f"optimizer-state bytes on the fullest rank, {what}", worst_goose, worst_peer,
                     "torch ZeroRedundancyOptimizer", "B"),
        Record.count("zero1", f"optimizer-state bytes on the fullest rank / (total / dp), {what}", worst_goose,
                     r["ideal_bytes"], "exp_avg + exp_avg_sq of all params / dp", "B"),
    ]
