"""Pipeline schedules as data: which (micro-batch, partition) cells run at each clock cycle."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple

__all__ = ["Cell", "Action", "clock_cycles", "Schedule", "GPipe", "OneFOneB", "SCHEDULES", "schedule_named",
           "timetable", "format_timetable"]

#: A unit of pipeline work: (micro-batch index, partition index).
Cell = tuple[int, int]


def clock_cycles(num_microbatches: int, num_partitions: int) -> list[list[Cell]]:
    """GPipe's forward clock cycles: cell (i, j) runs at clock i + j.

    With m=4 micro-batches and n=3 partitions::

        clock |  partition 0   partition 1   partition 2
        ------+------------------------------------------
          0   |    (0, 0)
          1   |    (1, 0)        (0, 1)
          2   |    (2, 0)        (1, 1)        (0, 2)
          3   |    (3, 0)        (2, 1)        (1, 2)
          4   |                  (3, 1)        (2, 2)
          5   |                                (3, 2)

    m + n - 1 clocks; in each, the cells listed run in parallel (each on its own partition).

    Raises:
        ValueError: ``num_microbatches`` or ``num_partitions`` < 1.
    """
    if num_microbatches < 1 or num_partitions < 1:
        raise ValueError(f"need >= 1 micro-batch and >= 1 partition, got m={num_microbatches}, "
                         f"n={num_partitions}")
    return [[(k - j, j) for j in range(max(0, k - num_microbatches + 1), min(k + 1, num_partitions))]
            for k in range(num_microbatches + num_partitions - 1)]


class Action(NamedTuple):
    """One unit of work of a partition: the forward (``"F"``) or backward (``"B"``) of a micro-batch."""

    kind: Literal["F", "B"]
    microbatch: int
    partition: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


class Schedule(ABC):
    """The order of work on every partition, forward and backward.

    A schedule is data: :meth:`actions` lists each partition's work in program order, and
    :func:`timetable` places it on unit clock ticks. Everything else is derived from it: the
    executor's order, the point-to-point messages of each boundary (:mod:`.messages`), the
    bubble and the micro-batches in flight.

    Two ways of running the backward, told apart by :attr:`backward_in_step`:

    * False (GPipe): the forward call runs :meth:`forward_cells`; ``loss.backward()`` runs the
      backward, in :meth:`backward_order` enforced inside autograd by virtual dependencies (see
      :mod:`goose_core.engine.dependency`), one edge between each pair of consecutive cells.
      That order must visit micro-batches in reverse forward order.
    * True (1F1B): backward cells interleave with forward cells, so the forward call runs
      :meth:`steps` in order, each backward explicitly, and ``loss.backward()`` only hands over
      the gradients (see :mod:`goose_core.engine.pipeline`).
    """

    #: The name ``schedule=`` takes.
    name: ClassVar[str]
    #: Whether backward cells run inside the step's forward call (interleaved with forward cells).
    backward_in_step: ClassVar[bool] = False

    def __init__(self, num_microbatches: int, num_partitions: int) -> None:
        self.num_microbatches = num_microbatches
        self.num_partitions = num_partitions
        clock_cycles(num_microbatches, num_partitions)  # validates

    @abstractmethod
    def forward_cells(self) -> list[Cell]:
        """Every forward cell, in an order that respects data dependencies ((i, j-1) before (i, j))."""

    @abstractmethod
    def backward_order(self, partition: int) -> list[int]:
        """The micro-batches whose backward runs on ``partition``, in the order they must run."""

    def actions(self, partition: int) -> list[Action]:
        """``partition``'s work in program order (default: every forward, then every backward)."""
        forward = [Action("F", i, j) for i, j in self.forward_cells() if j == partition]
        return forward + [Action("B", i, partition) for i in self.backward_order(partition)]

    def steps(self) -> list[Action]:
        """Every partition's work in one order that one process can run: by clock tick of
        :func:`timetable`, partitions in index order within a tick."""
        return [a for tick in timetable(self) for a in sorted(tick.values(), key=lambda a: a.partition)]


class GPipe(Schedule):
    """All forwards by clock cycle, then all backwards, each partition in reverse micro-batch order::

        forward  F0 F1 F2 F3               backward  B3 B2 B1 B0     (one partition)
    """

    name = "gpipe"

    def forward_cells(self) -> list[Cell]:
        return [cell for clock in clock_cycles(self.num_microbatches, self.num_partitions) for cell in clock]

    def backward_order(self, partition: int) -> list[int]:
        return list(reversed(range(self.num_microbatches)))


class OneFOneB(Schedule):
    """1F1B (PipeDream-Flush): warm up with forwards, then alternate one forward, one backward.

    Partition j of n runs ``w = min(n - 1 - j, m)`` warm-up forwards, then ``m - w`` pairs
    (forward of micro-batch ``w + k``, backward of ``k``), then ``w`` cool-down backwards. With
    m=4 micro-batches and n=3 partitions (:func:`timetable`, one tick per forward or backward)::

        tick | 0  1  2  3  4  5  6  7  8  9  10 11
        -----+-------------------------------------
        p0   | F0 F1 F2       B0 F3 B1    B2    B3
        p1   |    F0 F1    B0 F2 B1 F3 B2    B3
        p2   |       F0 B0 F1 B1 F2 B2 F3 B3

    The same 2(m + n - 1) ticks as GPipe, so the same bubble, (n - 1)/(m + n - 1); but
    partition j holds at most ``min(n - j, m)`` micro-batches' activations at once (forward done,
    backward not yet), where GPipe holds all m.
    """

    name = "1f1b"
    backward_in_step = True

    def _warmup(self, partition: int) -> int:
        return min(self.num_partitions - 1 - partition, self.num_microbatches)

    def actions(self, partition: int) -> list[Action]:
        m, w, j = self.num_microbatches, self._warmup(partition), partition
        out = [Action("F", i, j) for i in range(w)]
        for k in range(m - w):
            out += [Action("F", w + k, j), Action("B", k, j)]
        return out + [Action("B", k, j) for k in range(m - w, m)]

    def forward_cells(self) -> list[Cell]:
        return [(a.microbatch, a.partition) for a in self.steps() if a.kind == "F"]

    def backward_order(self, partition: int) -> list[int]:
        return list(range(self.num_microbatches))


#: Every schedule, by the name ``schedule=`` takes.
SCHEDULES: dict[str, type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB}


def schedule_named(name: str) -> type[Schedule]:
    """The schedule class called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {list(SCHEDULES)}")
    return SCHEDULES[name]


def timetable(schedule: Schedule) -> list[dict[int, Action]]:
    """Each clock tick's work, {partition: action}, when every forward and backward takes one tick.

    A partition runs its next action (in :meth:`Schedule.actions` order) at the first tick where
    its inputs are ready: F(i, j) after F(i, j-1); B(i, j) after B(i, j+1), or after F(i, j) on
    the last partition.

    Raises:
        ValueError: the schedule deadlocks (an action waits for one that never comes first).
    """
    n = schedule.num_partitions
    queues = [schedule.actions(j) for j in range(n)]
    done: set[tuple[str, int, int]] = set()
    ticks: list[dict[int, Action]] = []
    while any(queues):
        tick = {j: q[0] for j, q in enumerate(queues) if q and _ready(q[0], n, done)}
        if not tick:
            stuck = {j: str(q[0]) for j, q in enumerate(queues) if q}
            raise ValueError(f"schedule {type(schedule).__name__} deadlocks: next actions {stuck} "
                             f"all wait for work that has not run")
        for j, action in tick.items():
            queues[j].pop(0)
            done.add((action.kind, action.microbatch, j))
        ticks.append(tick)
    return ticks


def _ready(action: Action, n: int, done: set[tuple[str, int, int]]) -> bool:
    i, j = action.microbatch, action.partition
    if action.kind == "F":
        return j == 0 or ("F", i, j - 1) in done
    return ("F", i, j) in done and (j == n - 1 or ("B", i, j + 1) in done)


def format_timetable(schedule: Schedule) -> str:
    """The :func:`timetable` as the ASCII table of :class:`OneFOneB`'s docstring."""
    ticks = timetable(schedule)
    width = max(3, len(str(len(ticks))) + 1, *(len(str(a)) + 1 for t in ticks for a in t.values()))
    head = "tick | " + "".join(f"{k:<{width}}" for k in range(len(ticks)))
    rows = [f"p{j:<3} | " + "".join(f"{str(t[j]) if j in t else '':<{width}}" for t in ticks)
            for j in range(schedule.num_partitions)]
    return "\n".join([head.rstrip(), "-----+" + "-" * (len(head) - 6), *(r.rstrip() for r in rows)])
