"""Unit tests of the timeline recorder, driven by synthetic GPipe events (no engine needed)."""

import pytest

from goose_core import ParallelContext
from goose_core.engine.callbacks import CallbackList
from goose_core.engine.schedule import clock_cycles
from goose_core.instruments.timeline import (
    Span,
    Timeline,
    bubble_fraction,
    busy_time,
    cell_order,
    makespan,
    trim_waits,
)
from goose_core.testing import run_distributed


class FakeClock:
    """A clock the test sets: one clock cycle of the schedule is one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fire_gpipe(callbacks: CallbackList, clock: FakeClock, m: int, p: int, recompute: bool = False) -> None:
    """Fire the events of one GPipe step cycle by cycle: forwards, then backwards in reverse."""
    cycles = clock_cycles(m, p)
    for k, cells in enumerate(cycles):
        _fire_cycle(callbacks, clock, "forward", cells, float(k))
    width = 2.0 if recompute else 1.0  # a backward cycle is one recompute plus one backward
    for k, cells in enumerate(cycles):
        # The backward mirrors the forward: cell (i, j) runs where (m-1-i, p-1-j) ran forward.
        mirrored = [(m - 1 - i, p - 1 - j) for i, j in cells]
        start = len(cycles) + width * k
        if recompute:
            _fire_cycle(callbacks, clock, "recompute", mirrored, start)
        _fire_cycle(callbacks, clock, "backward", mirrored, start + width - 1.0)


def _fire_cycle(callbacks: CallbackList, clock: FakeClock, kind: str, cells: list, start: float) -> None:
    clock.now = start
    for i, j in cells:
        callbacks.fire(kind, "before", i, j)
    clock.now = start + 1.0
    for i, j in cells:
        callbacks.fire(kind, "after", i, j)


def _recorded(m: int, p: int, recompute: bool = False, **filters: int) -> Timeline:
    clock = FakeClock()
    timeline = Timeline(clock=clock)
    fire_gpipe(CallbackList([timeline.callback(**filters)]), clock, m, p, recompute)
    return timeline


@pytest.mark.parametrize("m, p", [(1, 1), (4, 2), (4, 3), (8, 4)])
def test_spans_of_a_gpipe_step(m: int, p: int) -> None:
    spans = _recorded(m, p).spans
    assert len(spans) == 2 * m * p
    for j in range(p):
        forwards = [("forward", i) for i in range(m)]
        backwards = [("backward", i) for i in reversed(range(m))]
        assert cell_order(spans, j) == forwards + backwards
    assert all(s.duration == 1.0 for s in spans)
    assert busy_time(spans) == {j: 2.0 * m for j in range(p)}
    assert makespan(spans) == 2.0 * (m + p - 1)
    # GPipe's bubble: (p - 1) / (m + p - 1) of every stage's time is idle.
    assert bubble_fraction(spans) == pytest.approx((p - 1) / (m + p - 1))


def test_recompute_spans_sit_just_before_their_backward() -> None:
    spans = _recorded(4, 2, recompute=True).spans
    order = cell_order(spans, 0)
    assert order[4:] == [(kind, i) for i in (3, 2, 1, 0) for kind in ("recompute", "backward")]


@pytest.mark.parametrize("filters, cells", [
    ({"microbatch_idx": 2}, {(2, 0), (2, 1), (2, 2)}),
    ({"partition_idx": 1}, {(i, 1) for i in range(4)}),
    ({"microbatch_idx": 0, "partition_idx": 2}, {(0, 2)}),
    ({"kinds": ["backward"]}, {(i, j) for i in range(4) for j in range(3)}),
])
def test_filters_pick_their_cells(filters: dict, cells: set) -> None:
    spans = _recorded(4, 3, **filters).spans
    assert {(s.microbatch_idx, s.partition_idx) for s in spans} == cells
    assert len(spans) == len(cells) * (1 if "kinds" in filters else 2)


def test_unbalanced_events_are_errors() -> None:
    timeline = Timeline(clock=FakeClock())
    callbacks = CallbackList([timeline.callback()])
    with pytest.raises(RuntimeError, match=r"backward of cell \(1, 0\) ended without starting"):
        callbacks.fire("backward", "after", 1, 0)
    callbacks.fire("forward", "before", 0, 0)
    with pytest.raises(RuntimeError, match=r"forward of cell \(0, 0\) started twice"):
        callbacks.fire("forward", "before", 0, 0)
    timeline.clear()
    callbacks.fire("forward", "before", 0, 0)  # clear() forgot the open cell
    callbacks.fire("forward", "after", 0, 0)
    assert len(timeline.spans) == 1


def test_attach_registers_on_the_pipeline() -> None:
    class Pipeline:
        callbacks = CallbackList()

    clock, model = FakeClock(), Pipeline()
    timeline = Timeline(clock=clock, rank=3)
    timeline.attach(model, partition_idx=1)
    fire_gpipe(model.callbacks, clock, 2, 2)
    assert {s.partition_idx for s in timeline.spans} == {1} and {s.rank for s in timeline.spans} == {3}


def test_empty_timeline_has_no_bubble() -> None:
    assert makespan([]) == 0.0 and bubble_fraction([]) == 0.0 and busy_time([]) == {}


def _record_own_partition(ctx: ParallelContext) -> list[Span]:
    # Each rank records only its own partition, with the wall clock, like a real pipeline rank.
    timeline = Timeline()
    callbacks = CallbackList([timeline.callback(partition_idx=ctx.pp_rank)])
    for kind in ("forward", "backward"):
        for i in range(3):
            callbacks.fire(kind, "before", i, ctx.pp_rank)
            callbacks.fire(kind, "after", i, ctx.pp_rank)
    return timeline.gather(ctx.pp_group)


def test_gather_collects_every_rank_on_every_rank() -> None:
    gathered = run_distributed(_record_own_partition, 1, 2, 1, timeout=60)
    assert gathered[0] == gathered[1]
    spans = gathered[0]
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    assert {(s.rank, s.partition_idx) for s in spans} == {(0, 0), (1, 1)}
    assert cell_order(spans, 1) == [("forward", i) for i in range(3)] + [("backward", i) for i in range(3)]


def test_trim_waits_cuts_the_wait_for_the_input() -> None:
    spans = [
        Span("forward", 0, 0, start=1.0, end=2.0),
        Span("forward", 0, 1, start=0.0, end=3.0),  # began waiting for (0, 0) at 0.0
        Span("backward", 0, 1, start=4.0, end=5.0),
        Span("backward", 0, 0, start=4.5, end=6.0),  # its gradient came from (0, 1) at 5.0
        Span("recompute", 0, 0, start=3.0, end=4.0),  # nothing to wait for
        Span("forward", 0, 0, start=11.0, end=12.0),  # the next step: its own producer counts
        Span("forward", 0, 1, start=10.0, end=13.0),
    ]
    trimmed = trim_waits(spans)
    assert [(s.start, s.end) for s in trimmed] == [(1.0, 2.0), (2.0, 3.0), (4.0, 5.0), (5.0, 6.0),
                                                   (3.0, 4.0), (11.0, 12.0), (12.0, 13.0)]
    assert busy_time(trimmed) == {0: 1.0 + 1.0 + 1.0 + 1.0, 1: 1.0 + 1.0 + 1.0}
