"""The executor: runs a schedule's cells, wiring GPipe's backward order into autograd or running 1F1B's.

GPipe (``Schedule.backward_in_step`` False): the forward call runs the forward cells;
``loss.backward()`` runs the backward. For each forward cell (i, j) held here, the executor
builds this piece of graph (the numbers are the order in which the backward crosses it)::

      recv / embed                                                  send / loss
    ──────────────► Join ─► [5 after] ─► cell ─► [2 before] ─► Fork ──────────►
                     ▲                   (Discard)              │
     phony of the cell whose             (3) backward          phony ─► Recompute (1) ─► Join of the
     backward runs next (6)                                              cell whose backward runs
                                                                         just before (its 6 is our 1)

1. Recompute (recomputed cells only) rebuilds cell (i, j) as soon as the previous cell of the
   backward order is done, while (i, j)'s own gradient may still be in flight. The first cell of
   the backward order hands its phony to the loss instead: it recomputes at once.
2. The gradient has arrived; ``backward before`` fires. 3. The cell's backward (through the
   rebuilt graph when recomputed). 5. ``backward after`` fires. 6. The phony releases the next
   cell of the backward order.

So the backward on each partition follows ``schedule.backward_order`` exactly, whatever order
the autograd engine would otherwise pick among ready nodes.

1F1B (``backward_in_step`` True, grad on): the forward call runs ``schedule.steps()`` in order;
a cell is built as above without the joins (no phony links micro-batches), and each backward
action is an explicit ``torch.autograd.backward`` of that micro-batch's roots with seed 1
(:meth:`Pipeline._run_in_step`). The stage parks the resulting gradients until the caller's
``loss.backward()`` (:mod:`.parked`). Without grad both schedules just run the forward cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from goose_core.engine.callbacks import CallbackList, Phase
from goose_core.engine.recompute import Recomputation, SplitReplay, recompute_stop
from goose_core.engine.dependency import fork, get_phony, join
from goose_core.engine.schedule import Cell, GPipe, Schedule
from goose_core.engine.split_backward import SplitCells
from goose_core.engine.transport import Transport

__all__ = ["Partition", "Pipeline", "Root", "StepOutput"]

Inputs = dict[str, Any]


@dataclass
class Partition:
    """One partition of the pipeline (a stage's share of the blocks), as the executor runs it.

    Args:
        index: the partition (stage) number j.
        body: ``(x, inputs) -> y``, the part of a cell that may be recomputed.
        embed: first partition only: ``inputs -> x``, run before ``body`` (never recomputed:
            its output is the cell's input, kept anyway).
        device: where the partition's tensors live.
    """

    index: int
    body: Callable[[Tensor, Inputs], Tensor]
    embed: Callable[[Inputs], Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class StepOutput:
    """What a step leaves on this process: last-partition outputs by micro-batch, and the
    phonies of the sends (they must reach the loss so that backward fetches their gradients)."""

    outputs: dict[int, Tensor]
    roots: list[Tensor]


class Root(torch.autograd.Function):
    """The loss a process returns for a step: its value, with edges to every root of the step.

    ``Root.apply(on_begin, on_end, value, *step.roots)``: the backward of ``value`` reaches every
    phony in :attr:`StepOutput.roots` too, so one ``loss.backward()`` runs this process's whole
    part of the schedule. Its backward is the first node of that part: it calls ``on_begin()``
    and queues ``on_end()`` on the autograd engine, which runs it when the whole backward has
    ended (the stage defers and then flushes data parallelism there, see :mod:`goose_core.pipeline.stage`)."""

    @staticmethod
    def forward(ctx, on_begin: Callable[[], None], on_end: Callable[[], None],  # type: ignore[override]
                value: Tensor, *roots: Tensor) -> Tensor:
        ctx.on_begin, ctx.on_end, ctx.num_roots = on_begin, on_end, len(roots)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.on_begin()
        torch.autograd.Variable._execution_engine.queue_callback(ctx.on_end)
        empty = torch.empty(0, device=grad.device)
        return (None, None, grad) + (empty,) * ctx.num_roots


class Mark(torch.autograd.Function):
    """Identity whose backward fires a ``backward`` callback: the cell's boundary in autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, callbacks: CallbackList, phase: Phase, i: int,  # type: ignore[override]
                j: int) -> Tensor:
        ctx.args = (callbacks, phase, i, j)
        return x.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        callbacks, phase, i, j = ctx.args
        callbacks.fire("backward", phase, i, j)
        return grad, None, None, None, None


class Pipeline:
    """Runs ``schedule`` over the partitions held by this process.

    Args:
        partitions: the partitions held here (all of them for a local transport, one per rank
            for a distributed one).
        num_partitions: the pipeline's depth.
        transport: moves tensors between partitions.
        recompute: which micro-batches recompute their forward: ``"always"``, ``"except_last"``
            or ``"never"`` (:func:`~goose_core.engine.recompute.recompute_stop`).
        callbacks: fired around every forward, backward and recompute.
        schedule: the schedule class (GPipe by default).
    """

    def __init__(self, partitions: list[Partition], num_partitions: int, transport: Transport,
                 recompute: str = "except_last", callbacks: CallbackList | None = None,
                 schedule: type[Schedule] = GPipe) -> None:
        recompute_stop(recompute, 1)  # validates the mode
        self.partitions = {p.index: p for p in partitions}
        self.num_partitions = num_partitions
        self.transport = transport
        self.recompute = recompute
        self.callbacks = callbacks if callbacks is not None else CallbackList()
        self.schedule_cls = schedule

    def run(self, microbatches: list[Inputs]) -> StepOutput:
        """The forward of every cell held here; the backward follows from the returned tensors
        (GPipe), or has run too when the schedule runs it in the step and grad is on (1F1B)."""
        m = len(microbatches)
        grad = torch.is_grad_enabled()
        schedule = self.schedule_cls(m, self.num_partitions)
        stop = recompute_stop(self.recompute, m) if grad else 0
        self.transport.begin(m, grad, schedule)
        try:
            return self._run(schedule, microbatches, stop, grad)
        except BaseException:
            # This rank stops here; what it already sent must still reach its peers, so that each
            # of them runs on to its own error (or names this rank missing) instead of losing
            # the message when this process exits and its connections close mid-transfer.
            self.transport.deliver_sent()
            raise

    def _run(self, schedule: Schedule, microbatches: list[Inputs], stop: int, grad: bool) -> StepOutput:
        if grad and schedule.backward_in_step:
            return self._run_in_step(schedule, microbatches, stop)
        # after[j][i]: the micro-batch whose backward runs right after i's on partition j.
        after = {j: _successors(schedule.backward_order(j)) for j in self.partitions}
        phonies: dict[tuple[int, int], Tensor] = {}
        step = StepOutput({}, [])
        for i, j in schedule.forward_cells():
            if j in self.partitions:
                self._cell(i, j, microbatches[i], i < stop, after[j], phonies, step)
        self.transport.end_forward()
        return step

    def _run_in_step(self, schedule: Schedule, microbatches: list[Inputs], stop: int) -> StepOutput:
        """Every action held here in :meth:`Schedule.steps` order, backwards included (1F1B).

        No virtual dependency links micro-batches: each backward is its own
        ``torch.autograd.backward`` over the roots of that micro-batch's cells (the loss or the
        send's phony, and the recompute's phony of a recomputed cell), with seed 1. With every
        partition here (local transport) the graph of a micro-batch is connected, so its first
        backward action (on the last partition) runs it through all partitions.

        Returns:
            the micro-batch losses (last partition), detached: their backward has run.
        """
        step = StepOutput({}, [])
        roots: dict[Cell, list[Tensor]] = {}  # cell -> its roots, until its backward
        split = SplitCells(schedule.split_backward)
        for action in schedule.steps():
            i, j = action.microbatch, action.partition
            if j not in self.partitions:
                continue
            if action.kind == "F":
                cell = StepOutput({}, [])
                with split.forward(i, j, i < stop):
                    self._cell(i, j, microbatches[i], i < stop, {}, {}, cell, split if split.enabled else None)
                roots[(i, j)] = cell.roots + list(cell.outputs.values())
                step.outputs.update({k: v.detach() for k, v in cell.outputs.items()})
            elif action.kind == "W":
                split.weight(i, j, self.callbacks)
            else:
                # A boundary crossed in this process links (i, j) to (i, j - 1) ... in autograd:
                # one backward from (i, j) runs them all, so their roots join it.
                reached = [(i, k) for k in _joined(j, self.transport) if (i, k) in roots]
                tensors = [t for c in reached for t in roots.pop(c) if t.requires_grad]
                if tensors and split.enabled:
                    split.input(reached, tensors, get_phony(self.partitions[j].device, requires_grad=True))
                elif tensors:
                    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                del tensors  # a split backward's graph lives on until its W, not until the next B
        self.transport.end_forward()
        self.transport.end_backward()
        return step

    def _cell(self, i: int, j: int, inputs: Inputs, recomputed: bool, after: dict[int, int],
              phonies: dict[tuple[int, int], Tensor], step: StepOutput, split: SplitReplay | None = None) -> None:
        part, cb = self.partitions[j], self.callbacks
        inputs = {k: v.to(part.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        cb.fire("forward", "before", i, j)
        x = part.embed(inputs) if part.embed is not None else self.transport.recv(i, j)
        tracked = torch.is_grad_enabled()
        if tracked and i in after:
            # The phony of the cell that goes backward next: it stays blocked until this
            # cell's backward has passed the join.
            if (j, after[i]) not in phonies:
                raise RuntimeError(f"schedule {self.schedule_cls.__name__} runs the backward of "
                                   f"micro-batch {after[i]} after {i}'s on partition {j}, so its "
                                   f"forward must run first; it did not")
            x = join(x, phonies.pop((j, after[i])))
        if tracked and x.requires_grad:
            x = Mark.apply(x, cb, "after", i, j)
        record = None
        if recomputed:
            record = Recomputation(lambda t: part.body(t, inputs), x, (i, j), cb, split)
            y = record.run(get_phony(part.device, requires_grad=True))
        else:
            y = part.body(x, inputs)
        phony = None
        if tracked and y.requires_grad:
            y = Mark.apply(y, cb, "before", i, j)
            if record is not None or i in after.values():
                y, phony = fork(y)
        cb.fire("forward", "after", i, j)
        if j == self.num_partitions - 1:
            step.outputs[i] = y
        elif (root := self.transport.send(y, i, j)) is not None:
            step.roots.append(root)
        if phony is not None:
            self._release(i, j, phony, record, after, phonies, step)

    def _release(self, i: int, j: int, phony: Tensor, record: Recomputation | None,
                 after: dict[int, int], phonies: dict[tuple[int, int], Tensor], step: StepOutput) -> None:
        """Decide what the backward of cell (i, j) waits for besides its gradient.

        Recompute is created after the send so that autograd, which runs the most recently
        created of its ready nodes first, recomputes before it blocks on the incoming gradient.
        """
        if record is not None:
            phony = record.recompute(phony)
        if i in after.values():
            phonies[(j, i)] = phony  # joined into the cell whose backward runs just before i's
        else:
            step.roots.append(phony)  # first of the backward order, or 1F1B's own: recompute at once


def _successors(order: list[int]) -> dict[int, int]:
    """{micro-batch: the one whose backward runs right after it} for a backward ``order``."""
    return {order[k]: order[k + 1] for k in range(len(order) - 1)}


def _joined(j: int, transport: Transport) -> list[int]:
    """Partition j and those before it whose graph a backward from j reaches in this process."""
    out = [j]
    while out[-1] > 0 and transport.joins(out[-1]):
        out.append(out[-1] - 1)
    return out
