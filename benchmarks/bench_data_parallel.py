"""goose DataParallel beside torch DDP: the same model, data and ranks, step times interleaved."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.results import Record
from goose_core import DataParallel, ParallelContext, spawn
from goose_core.data import shard_batch
from goose_core.testing import TrainSpec

WORLD = 2
ROUNDS = 9
STEPS = 5  # timed steps per round, after one warm-up step
#: ~3.2M parameters (13 MB of fp32 gradients): big enough that communication shows.
SPEC = TrainSpec(family="gpt2", batch_size=8, seq_len=64, overrides={"n_embd": 256, "n_layer": 4})


def timed_steps(ctx: ParallelContext, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per training step (forward, backward, step, zero_grad), between two barriers."""
    def one(step: int) -> None:
        batch = shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    one(0)
    dist.barrier()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        one(step)
    dist.barrier()
    return (time.perf_counter() - start) / steps


def interleave(ctx: ParallelContext, builds: dict[str, Callable[[], tuple[nn.Module, torch.optim.Optimizer]]]
               ) -> dict[str, float]:
    """Median seconds per step of each build, rounds alternating so drift hits all alike."""
    built = {name: build() for name, build in builds.items()}
    times: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(ROUNDS):
        for name, (model, optimizer) in built.items():
            times[name].append(timed_steps(ctx, model, optimizer, STEPS))
    return {name: statistics.median(t) for name, t in times.items()}


def _body() -> dict[str, float]:
    ctx = ParallelContext(data_parallel_size=WORLD)

    def goose() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DataParallel(SPEC.build_model(), ctx).parallelize()
        return model, SPEC.build_optimizer(model.parameters())

    def ddp() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DistributedDataParallel(SPEC.build_model(), process_group=ctx.dp_group)
        return model, SPEC.build_optimizer(model.parameters())

    return interleave(ctx, {"goose": goose, "ddp": ddp})


def run() -> list[Record]:
    t = spawn(_body, WORLD, timeout=600)[0]
    return [Record("data_parallel", f"step time, gpt2 3.2M params, dp={WORLD}, 25 MB buckets, median of "
                   f"{ROUNDS}x{STEPS} steps", t["goose"], t["ddp"], "torch DDP")]
