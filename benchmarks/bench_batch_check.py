"""The batch check's cost per training step: every forward's report beside no check after the first.

``distributed/batch_check.py`` agrees on a small report (shapes, id extremes) in one all-reduce
on every forward; before it did, the check ran on the first forward only. Both sides are built
in the same ranks and timed in alternating rounds (``benchmarks.paired``), a sample being
``STEPS`` training steps between barriers; the "before" side is the same model whose hook
does nothing after its first forward. Two layouts: dp=2 (DataParallel alone: the report adds an
all-reduce beside the target count) and tp=2 x pp=2 (the report rides the world in one all-reduce
where the first forward's checksum took one per group).

Run: ``python -m benchmarks batch_check`` (appends results.json), or ``python -m
benchmarks.bench_batch_check`` to print the two ratios only.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.paired import Pairs, alternate
from benchmarks.results import Record
from goose_core import ParallelContext
from goose_core.data import shard_batch
from goose_core.distributed.batch_check import BatchCheck
from goose_core.distributed.batch_faults import REPORT_SIZE
from goose_core.metadata import batch_check_of
from goose_core.testing import TrainSpec, at_layout, run_distributed

ROUNDS = 12
STEPS = 3  # training steps per sample
#: Tiny on purpose: the smaller the step, the larger a fixed per-forward cost shows.
SPEC = TrainSpec(family="llama", batch_size=8, seq_len=64, dtype=torch.float32)
LAYOUTS = [(1, 1, 2), (2, 2, 1)]  # (tp, pp, dp)


class _FirstOnly(BatchCheck):
    """The check as it was: nothing after the first forward (the checksum's, policy "first")."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        return None


def _build(ctx: ParallelContext, before: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = at_layout(SPEC.build_model(), ctx, num_microbatches=2)
    optimizer = SPEC.build_optimizer(model.parameters())
    _steps(ctx, model, optimizer, 1)  # the first forward checks on both sides
    if before:
        batch_check_of(model).__class__ = _FirstOnly  # type: ignore[union-attr]
    return model, optimizer


def _steps(ctx: ParallelContext, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per training step (forward, backward, step, zero_grad), between two barriers."""
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        model(**shard_batch(SPEC.batch(step), ctx.dp_rank, ctx.dp_size)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def _median_seconds(fn: Any, calls: int = 50) -> float:
    times = []
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hook_seconds(ctx: ParallelContext, model: nn.Module) -> tuple[float, float]:
    """The hook alone, called as the forward calls it, and one bare all-reduce of as many int64
    over the world: median seconds of 50 calls each."""
    check, batch = batch_check_of(model), shard_batch(SPEC.batch(0), ctx.dp_rank, ctx.dp_size)
    assert type(check) is BatchCheck, type(check)
    table = torch.zeros(ctx.dp_size, 2 * REPORT_SIZE, dtype=torch.int64)
    return (_median_seconds(lambda: check(model, (), batch)),  # type: ignore[misc]
            _median_seconds(lambda: dist.all_reduce(table, op=dist.ReduceOp.MAX)))


def _body(ctx: ParallelContext) -> tuple[Pairs, tuple[float, float]]:
    after, before = _build(ctx, False), _build(ctx, True)
    assert type(batch_check_of(before[0])) is _FirstOnly
    pairs = alternate(lambda: _steps(ctx, *after, STEPS), lambda: _steps(ctx, *before, STEPS), ROUNDS)
    with torch.enable_grad():  # a training forward's hook: the dp ranks join
        return pairs, _hook_seconds(ctx, after[0])


def run() -> list[Record]:
    records = []
    for tp, pp, dp in LAYOUTS:
        pairs, hook = run_distributed(_body, tp, pp, dp, timeout=600)[0]
        print(f"tp={tp} x pp={pp} x dp={dp}: the hook {hook[0] * 1e6:.0f} us per forward, a bare all-reduce "
              f"of its table {hook[1] * 1e6:.0f} us (medians of 50 calls)")
        records.append(Record.timed("batch_check", f"step time, llama tiny fp32, batch 8x64, tp={tp} x pp={pp} "
                                    f"x dp={dp}, {ROUNDS} rounds x {STEPS} steps", pairs,
                                    "the same run, batch checked on the first forward only"))
    return records


if __name__ == "__main__":
    for record in run():
        print(f"{record.metric}: after / before {record.ratio:.3f} (95% interval {record.low:.3f} .. "
              f"{record.high:.3f}, {record.pairs} pairs); medians {record.goose * 1e3:.1f} ms / "
              f"{record.peer * 1e3:.1f} ms")
