"""A sleep-calibrated pipeline: stages whose forward and backward take a fixed time, no maths.

Sleeping releases the CPU, so four ranks on a two-core machine behave like four devices: what
the clock measures is the schedule (bubbles, waiting on neighbours, transfers), not contention.
GPipe's ideal step time for p stages and M micro-batches is ``(M + p - 1) * (t_f + t_b)``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from goose_core.distributed.context import ParallelContext
from goose_core.engine.callbacks import CallbackList
from goose_core.engine.p2p import DistributedTransport
from goose_core.engine.pipeline import Partition, Pipeline, Root
from goose_core.engine.schedule import GPipe, Schedule

__all__ = ["Sleep", "SleepWeight", "ideal_gpipe_time", "SleepPipeline"]


class Sleep(torch.autograd.Function):
    """Identity that sleeps ``forward`` seconds, and ``backward`` seconds in its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, forward: float, backward: float) -> Tensor:  # type: ignore[override]
        ctx.backward_time = backward
        time.sleep(forward)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        time.sleep(ctx.backward_time)
        return grad, None, None


class _SleepGrad(torch.autograd.Function):
    """Zeros shaped like ``like`` from ``weight``; its backward sleeps, then returns zeros."""

    @staticmethod
    def forward(ctx, weight: Tensor, like: Tensor, backward: float) -> Tensor:  # type: ignore[override]
        ctx.backward_time, ctx.shape = backward, weight.shape
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        time.sleep(ctx.backward_time)
        return torch.zeros(ctx.shape, dtype=grad.dtype), None, None


class SleepWeight(torch.nn.Module):
    """A module with a weight whose gradient takes ``backward`` seconds (a split backward's W)
    and adds nothing to the forward."""

    def __init__(self, hidden: int, backward: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))
        self.backward_time = backward

    def forward(self, x: Tensor) -> Tensor:
        return _SleepGrad.apply(self.weight, x.detach(), self.backward_time)


class _Scale(torch.nn.Module):
    """The first stage's input times a weight, as a module: a split backward's B then runs the
    first stage's input-gradient sleep, as a model's B runs its first stage down to the token
    lookup (whose W needs that gradient)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def ideal_gpipe_time(num_microbatches: int, num_stages: int, t_forward: float, t_backward: float) -> float:
    """(M + p - 1) * (t_f + t_b): every stage busy except for the fill and drain bubbles."""
    return (num_microbatches + num_stages - 1) * (t_forward + t_backward)


class SleepPipeline:
    """This rank's stage of a p-stage pipeline of :class:`Sleep` cells over the real transport.

    Args:
        ctx: this rank's context (the pipeline group is used).
        t_forward: seconds per cell forward.
        t_backward: seconds per cell backward.
        hidden: size of the activation sent between stages.
        schedule: the schedule class (GPipe by default); with virtual stages each of this
            rank's V chunks takes ``t_forward / V`` and ``t_backward / V``; with a split backward
            B and W take half of the backward each.
    """

    def __init__(self, ctx: ParallelContext, num_microbatches: int, t_forward: float,
                 t_backward: float, recompute: str = "never", hidden: int = 1024,
                 callbacks: CallbackList | None = None, schedule: type[Schedule] = GPipe) -> None:
        self.ctx, self.num_microbatches, self.hidden = ctx, num_microbatches, hidden
        self.scale = _Scale(hidden)
        self.schedule = schedule
        # With virtual stages a rank's stage is cut into V chunks, each 1/V of its time.
        v, n = schedule.virtual_stages, ctx.pipeline_parallel_size * schedule.virtual_stages
        held = schedule(num_microbatches, n).partitions_of(ctx.pipeline_parallel_rank)

        split = schedule.split_backward

        def body(j: int) -> Callable[[Tensor, dict], Tensor]:
            # A split backward sleeps half in B (the input's gradient), half in W (the weight's).
            weight = SleepWeight(hidden, t_backward / v / 2) if split else None

            def run(x: Tensor, inputs: dict) -> Tensor:
                y = Sleep.apply(x, t_forward / v, t_backward / v / (2 if split else 1))
                if weight is not None:
                    y = y + weight(y)
                return y.sum() if j == n - 1 else y
            return run

        embed = lambda inputs: self.scale(inputs["x"])  # noqa: E731
        self.transport = DistributedTransport(ctx.pp_group, ctx.prev_pipeline_rank,
                                              ctx.next_pipeline_rank, ctx.device, ctx.group_ranks("pp"))
        self.pipeline = Pipeline([Partition(j, body(j), embed if j == 0 else None) for j in held], n,
                                 self.transport, recompute, callbacks, schedule)

    def run_step(self) -> None:
        """One forward and backward of M micro-batches."""
        microbatches = [{"x": torch.ones(self.hidden)} for _ in range(self.num_microbatches)]
        out = self.pipeline.run(microbatches)
        if self.schedule.backward_in_step:
            return  # the backward ran in the step
        total = sum(out.outputs.values()) if out.outputs else torch.zeros(())
        Root.apply(lambda: None, self.transport.end_backward, total, *out.roots).backward()

    def step(self) -> float:
        """:meth:`run_step`, timed from a barrier to a barrier of the pipeline group (seconds)."""
        torch.distributed.barrier(group=self.ctx.pp_group)
        start = time.perf_counter()
        self.run_step()
        torch.distributed.barrier(group=self.ctx.pp_group)
        return time.perf_counter() - start
