"""A timeline recorder built on pipeline callbacks: when each forward, backward and recompute ran.

Every (kind, micro-batch, partition) cell becomes a :class:`Span` from its "before" event to its
"after" event. Each rank records its own cells; :meth:`Timeline.gather` collects the spans of
every rank of the pipeline group, so rank 0 can draw the whole pipeline::

    partition 0 | F0 F1 F2 F3 .  .  .  .  .  .  B3 B2 B1 B0
    partition 1 | .  F0 F1 F2 F3 .  .  .  .  B3 B2 B1 B0 .
    partition 2 | .  .  F0 F1 F2 F3 .  .  B3 B2 B1 B0 .  .      "." is the bubble
                  ─────────────────────── time ───────────────────────►

Timestamps come from ``time.time()`` by default: the wall clock, which every process on a host
shares (ranks on several hosts need synchronised clocks, as NTP gives to ~1 ms). On CUDA the host
only *launches* work; ``synchronize=True`` waits for the device at every event, so spans show
execution, at the cost of serialising the streams the pipeline overlaps.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from goose_core.engine.callbacks import Callback, Event, Kind

__all__ = ["Span", "Timeline", "trim_waits", "busy_time", "makespan", "bubble_fraction", "cell_order"]


@dataclass(frozen=True)
class Span:
    """``kind`` of micro-batch ``microbatch_idx`` on partition ``partition_idx``, run by ``rank``
    from ``start`` to ``end`` (seconds)."""

    kind: Kind
    microbatch_idx: int
    partition_idx: int
    start: float
    end: float
    rank: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


class Timeline:
    """Record a :class:`Span` for every cell between its "before" and "after" events.

    Use it as a callback (``PipelineParallel(..., callbacks=[timeline.callback()])``) or attach it
    to a parallelized pipeline (``timeline.attach(model)``)::

        timeline = Timeline()
        timeline.attach(model)
        train_loop(model, optimizer, batches)
        spans = timeline.gather(ctx.pp_group)     # every rank's spans, on every rank
        if ctx.rank == 0:
            draw_gantt(spans, "gantt.png")

    Args:
        clock: seconds, shared by every rank that is gathered (default ``time.time``).
        synchronize: wait for the current CUDA device at every event (see the module docstring).
        rank: stamped on every span (default: this process's global rank, or 0).
    """

    def __init__(self, clock: Callable[[], float] = time.time, synchronize: bool = False,
                 rank: int | None = None) -> None:
        self.clock = clock
        self.synchronize = synchronize and torch.cuda.is_available()
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.spans: list[Span] = []
        self._open: dict[tuple[Kind, int, int], float] = {}

    def record(self, event: Event) -> None:
        """Open the event's cell on "before", close it into a span on "after".

        Raises:
            RuntimeError: an "after" with no "before", or a second "before" of an open cell (the
                executor's events are unbalanced).
        """
        if self.synchronize:
            torch.cuda.synchronize()
        now = self.clock()
        key = (event.kind, event.microbatch_idx, event.partition_idx)
        if event.phase == "before":
            if key in self._open:
                raise RuntimeError(f"{event.kind} of cell {key[1:]} started twice without ending")
            self._open[key] = now
            return
        if key not in self._open:
            raise RuntimeError(f"{event.kind} of cell {key[1:]} ended without starting")
        self.spans.append(Span(*key, start=self._open.pop(key), end=now, rank=self.rank))

    def callback(self, microbatch_idx: int | None = None, partition_idx: int | None = None,
                 kinds: Sequence[Kind] | None = None) -> Callback:
        """A :class:`Callback` that records into this timeline, with the usual filters."""
        return Callback(self.record, microbatch_idx, partition_idx, kinds)

    def attach(self, model: Any, **filters: Any) -> Callback:
        """Register :meth:`callback` on ``model.callbacks`` (a pipeline's CallbackList)."""
        return model.callbacks.add(self.callback(**filters))

    def clear(self) -> None:
        """Forget every span (e.g. after warm-up steps), and any cell left open by an error."""
        self.spans.clear()
        self._open.clear()

    def gather(self, group: dist.ProcessGroup | None = None) -> list[Span]:
        """Every rank's spans in ``group`` (all ranks must call), on every rank, by start time.

        Without ``torch.distributed`` initialised this is just this rank's spans.
        """
        if not dist.is_initialized():
            return sorted(self.spans, key=_start_order)
        parts: list[list[Span]] = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(parts, list(self.spans), group=group)
        return sorted((span for part in parts for span in part), key=_start_order)


def _start_order(span: Span) -> float:
    # Only the start: the sort is stable, so equal stamps (a coarse clock) keep the recorded order.
    return span.start


def trim_waits(spans: Sequence[Span]) -> list[Span]:
    """The spans with the waiting cut off their start: a forward of (i, j) cannot compute before
    the forward of (i, j-1) ended, nor a backward of (i, j) before the backward of (i, j+1).

    A "before" event may fire ahead of the receive of the cell's input (the executor fires it
    first, then waits for the activation), so a raw span of a later stage can begin long before
    its data exists. Needs the gathered spans of every partition, on one shared clock.
    """
    ends: dict[tuple[str, int, int], list[float]] = {}
    for span in spans:
        ends.setdefault((span.kind, span.microbatch_idx, span.partition_idx), []).append(span.end)
    for times in ends.values():
        times.sort()
    return [replace(span, start=min(max(span.start, _ready(span, ends)), span.end)) for span in spans]


def _ready(span: Span, ends: dict[tuple[str, int, int], list[float]]) -> float:
    """When the input of ``span`` existed: the latest end of its producer before ``span`` ended."""
    step = {"forward": -1, "backward": 1}.get(span.kind)
    if step is None:
        return span.start  # a recompute reads its own saved input
    times = ends.get((span.kind, span.microbatch_idx, span.partition_idx + step), [])
    k = bisect.bisect_right(times, span.end)
    return times[k - 1] if k else span.start


def busy_time(spans: Sequence[Span]) -> dict[int, float]:
    """Seconds each partition spent computing (forward + backward + recompute), by partition."""
    busy: dict[int, float] = {}
    for span in spans:
        busy[span.partition_idx] = busy.get(span.partition_idx, 0.0) + span.duration
    return dict(sorted(busy.items()))


def makespan(spans: Sequence[Span]) -> float:
    """Seconds from the first start to the last end."""
    return max(s.end for s in spans) - min(s.start for s in spans) if spans else 0.0


def bubble_fraction(spans: Sequence[Span]) -> float:
    """The share of (partitions x makespan) in which no partition computed: GPipe's bubble,
    ideally (p - 1) / (M + p - 1) for p partitions and M micro-batches."""
    busy = busy_time(spans)
    total = len(busy) * makespan(spans)
    return 1.0 - sum(busy.values()) / total if total > 0 else 0.0


def cell_order(spans: Sequence[Span], partition_idx: int) -> list[tuple[Kind, int]]:
    """``(kind, micro-batch)`` of every span of ``partition_idx``, in the order they started."""
    ordered = sorted(spans, key=_start_order)
    return [(s.kind, s.microbatch_idx) for s in ordered if s.partition_idx == partition_idx]
