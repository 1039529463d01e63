"""goose DataParallel beside torch DDP: the same model, data and ranks, step times paired and interleaved."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import DataParallel, ParallelContext, spawn
from goose_core.data import shard_batch
from goose_core.testing import TrainSpec

WORLD = 2
ROUNDS = 12
STEPS = 3  # training steps per sample
#: ~3.2M parameters (13 MB of fp32 gradients): big enough that communication shows. fp32, as
#: users train (the harness's float64 default is for parity, not speed).
SPEC = TrainSpec(family="gpt2", batch_size=8, seq_len=64, dtype=torch.float32,
                 overrides={"n_embd": 256, "n_layer": 4})

Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]


def timed_steps(ctx: ParallelContext, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per training step (forward, backward, step, zero_grad), between two barriers."""
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        batch = shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def paired_steps(ctx: ParallelContext, goose: Build, peer: Build) -> Pairs:
    """Both built side by side in these ranks, then timed in alternating rounds."""
    a, b = goose(), peer()
    return alternate(lambda: timed_steps(ctx, *a, STEPS), lambda: timed_steps(ctx, *b, STEPS), ROUNDS)


def _body() -> Pairs:
    ctx = ParallelContext(data_parallel_size=WORLD)

    def goose() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DataParallel(SPEC.build_model(), ctx).parallelize()
        return model, SPEC.build_optimizer(model.parameters())

    def ddp() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = DistributedDataParallel(SPEC.build_model(), process_group=ctx.dp_group)
        return model, SPEC.build_optimizer(model.parameters())

    return paired_steps(ctx, goose, ddp)


def run() -> list[Record]:
    pairs = spawn(_body, WORLD, timeout=600)[0]
    return [Record.timed("data_parallel", f"step time, gpt2 3.2M params fp32, dp={WORLD}, 25 MB buckets, "
                         f"{ROUNDS} rounds x {STEPS} steps", pairs, "torch DDP")]
