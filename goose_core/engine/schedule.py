"""Pipeline schedules as data: which (micro-batch, partition) cells run at each clock cycle."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, NamedTuple

__all__ = ["Cell", "Action", "clock_cycles", "Schedule", "ProgramSchedule", "RankProgramSchedule", "GPipe", "OneFOneB", "Interleaved1F1B", "ZeroBubbleH1", "ZeroBubbleV", "SCHEDULES",
           "schedule_named", "timetable", "timetable_bubble", "format_timetable"]

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
    """One unit of work of a partition: the forward (``"F"``) or backward (``"B"``) of a
    micro-batch; with a split backward, ``"B"`` is its input gradient and ``"W"`` its weight
    gradient."""

    kind: Literal["F", "B", "W"]
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
    #: Partitions (chunks) per rank: partition j runs on rank ``rank_of(j)`` of ``num_ranks``.
    virtual_stages: ClassVar[int] = 1
    #: Whether each backward is split into B (input gradient) and a later W (weight gradient).
    split_backward: ClassVar[bool] = False

    def __init__(self, num_microbatches: int, num_partitions: int) -> None:
        self.num_microbatches = num_microbatches
        self.num_partitions = num_partitions
        clock_cycles(num_microbatches, num_partitions)  # validates
        if num_partitions % self.virtual_stages:
            raise ValueError(f"{num_partitions} partitions do not split into {self.virtual_stages} "
                             f"virtual stages per rank")
        self.num_ranks = num_partitions // self.virtual_stages

    def rank_of(self, partition: int) -> int:
        """The rank that runs ``partition`` (itself, one partition per rank)."""
        return partition

    def partitions_of(self, rank: int) -> list[int]:
        """The partitions ``rank`` runs, in index order."""
        return [j for j in range(self.num_partitions) if self.rank_of(j) == rank]

    def rank_actions(self, rank: int) -> list[Action]:
        """``rank``'s work in program order, over every partition it holds."""
        return self.actions(rank)

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
        :func:`timetable`, partitions in index order within a tick (so each rank's work in its
        program order)."""
        return [a for tick in timetable(self) for a in sorted(tick.values(), key=lambda a: a.partition)]


class ProgramSchedule(Schedule):
    """A schedule written as each partition's program (:meth:`actions`): its forward cells and
    backward orders are read off the programs."""

    def forward_cells(self) -> list[Cell]:
        return [(a.microbatch, a.partition) for a in self.steps() if a.kind == "F"]

    def backward_order(self, partition: int) -> list[int]:
        return [a.microbatch for a in self.actions(partition) if a.kind == "B"]


class RankProgramSchedule(ProgramSchedule):
    """A schedule written as each rank's program over the partitions it holds (:meth:`rank_actions`)."""

    def actions(self, partition: int) -> list[Action]:
        return [a for a in self.rank_actions(self.rank_of(partition)) if a.partition == partition]


class GPipe(Schedule):
    """All forwards by clock cycle, then all backwards, each partition in reverse micro-batch order::

        forward  F0 F1 F2 F3               backward  B3 B2 B1 B0     (one partition)
    """

    name = "gpipe"

    def forward_cells(self) -> list[Cell]:
        return [cell for clock in clock_cycles(self.num_microbatches, self.num_partitions) for cell in clock]

    def backward_order(self, partition: int) -> list[int]:
        return list(reversed(range(self.num_microbatches)))


class OneFOneB(ProgramSchedule):
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

    def backward_order(self, partition: int) -> list[int]:
        return list(range(self.num_microbatches))


class Interleaved1F1B(RankProgramSchedule):
    """Interleaved 1F1B (Megatron's virtual pipeline): each rank holds V non-adjacent chunks.

    The model is cut into n = p·V partitions (chunks); rank r holds chunks r, r + p, ...,
    r + (V-1)p, so a micro-batch loops V times around the p ranks. Each rank works in rounds
    of p micro-batches: forwards of the round on its chunk 0, then on its chunk 1, ...;
    backwards in the same rounds, last chunk first. Rank r warms up with
    ``(V-1)p + 2(p-1-r)`` forwards, then alternates one forward, one backward. At p=2, V=2,
    m=4 (ranks as rows, ``F2.1``: forward of micro-batch 2 on the rank's chunk 1)::

        tick | 0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
        r0   | F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0      B2.1      B3.1 B2.0 B3.0
        r1   |      F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0

    A chunk's forward or backward takes 1/V of a whole stage's, so the ramp of p-1 ticks costs
    1/V as much: the bubble is (p-1)/(V·m + p-1) (:func:`timetable_bubble`), where 1F1B's is
    (p-1)/(m + p-1). The price is memory: rank r holds at most ``(V-1)p + 2(p-1-r) + 1``
    chunks' activations at once, each 1/V of a stage's (rank 0 at p=4, V=2: 5.5 stages' worth,
    where 1F1B holds ``p - r`` = 4), and V times as many messages. The rounds need m a multiple
    of p.
    """

    name = "interleaved-1f1b"
    backward_in_step = True
    virtual_stages: ClassVar[int] = 2

    def __init__(self, num_microbatches: int, num_partitions: int) -> None:
        super().__init__(num_microbatches, num_partitions)
        p = self.num_ranks
        if self.virtual_stages < 2:
            raise ValueError(f"schedule='interleaved-1f1b' needs virtual_stages >= 2 (chunks per rank), "
                             f"got {self.virtual_stages}: with 1 it is schedule='1f1b'")
        if num_microbatches % p:
            raise ValueError(f"schedule='interleaved-1f1b' runs micro-batches in rounds of the pipeline "
                             f"depth {p}: num_microbatches must be a multiple of {p}, got "
                             f"{num_microbatches} (use {p * max(1, round(num_microbatches / p))})")

    @classmethod
    def with_virtual_stages(cls, virtual_stages: int) -> type["Interleaved1F1B"]:
        """This schedule with ``virtual_stages`` chunks per rank."""
        return type(cls.__name__, (cls,), {"virtual_stages": virtual_stages, "__doc__": cls.__doc__,
                                           "__module__": cls.__module__})

    def rank_of(self, partition: int) -> int:
        return partition % self.num_ranks

    def _action(self, kind: Literal["F", "B"], k: int, rank: int) -> Action:
        """The rank's k-th forward (or backward): round k // (pV), chunk (k // p) mod V."""
        p, v = self.num_ranks, self.virtual_stages
        chunk = (k // p) % v
        if kind == "B":
            chunk = v - 1 - chunk
        return Action(kind, (k // (p * v)) * p + k % p, chunk * p + rank)

    def rank_actions(self, rank: int) -> list[Action]:
        p, total = self.num_ranks, self.num_microbatches * self.virtual_stages
        warmup = min((self.virtual_stages - 1) * p + 2 * (p - 1 - rank), total)
        out = [self._action("F", k, rank) for k in range(warmup)]
        for k in range(total - warmup):
            out += [self._action("F", warmup + k, rank), self._action("B", k, rank)]
        return out + [self._action("B", k, rank) for k in range(total - warmup, total)]



class ZeroBubbleH1(ProgramSchedule):
    """ZB-H1 (zero bubble, Qi et al. 2024): 1F1B with each backward split into B and W.

    B is the input gradient, sent to the previous stage at once; W, the weight gradient, waits:
    nothing downstream needs it, so it fills the ticks 1F1B leaves idle. Rank r of p warms up
    with ``p - 1 - r`` forwards like 1F1B, then runs (F, B) pairs, holding back its first r W's
    and then one W after each pair; the cool-down runs B, W and the W's held back. With one tick
    per F, B and W (p=3, m=4)::

        tick | 0  1  2  3  4  5  6  7  8  9  10 11 12 13
        p0   | F0 F1 F2       B0 W0 F3 B1 W1 B2 W2 B3 W3
        p1   |    F0 F1    B0 F2 B1 W0 F3 B2 W1 B3 W2 W3
        p2   |       F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3

    The ramp costs (p-1)·(F + B - W) instead of 1F1B's (p-1)·(F + B + W): a bubble of
    (p-1)/(3m + p-1) for m >= p, where 1F1B's is 3(p-1)/(3m + 3(p-1)). A cell's activations
    live from its F to its W, so rank r holds up to r more than under 1F1B, at most min(p, m):
    rank 0's count, 1F1B's peak. The executor runs B and W with :mod:`.split_backward`.
    """

    name = "zb-h1"
    backward_in_step = True
    split_backward = True

    def actions(self, partition: int) -> list[Action]:
        m, j = self.num_microbatches, partition
        w = min(self.num_ranks - 1 - j, m)
        out = [Action("F", i, j) for i in range(w)]
        held = list(range(m))  # micro-batches whose W is still to run, oldest first
        for k in range(m - w):
            out += [Action("F", w + k, j), Action("B", k, j)]
            if k >= j:
                out.append(Action("W", held.pop(0), j))
        for k in range(m - w, m):
            out += [Action("B", k, j), Action("W", held.pop(0), j)]
        return out + [Action("W", i, j) for i in held]



class ZeroBubbleV(RankProgramSchedule):
    """ZBV (zero bubble, V-shaped): two chunks per rank placed in a V, each backward split in B and W.

    The model is cut into 2p chunks; rank r holds chunk r on the way down and chunk 2p-1-r on
    the way back, so rank 0 holds the first and the last chunk (the embedding and the head) and
    rank p-1 two adjacent ones, handed over in memory::

        chunk  0   1   2   3   4   5   6   7        p=4
        rank   0   1   2   3   3   2   1   0

    The rank order is torch's ``ScheduleZBVZeroBubble``'s (Qi et al.'s ZB-V): warm up with
    2(p-r)-1 forwards of the first chunk, r pairs of both chunks' forwards, then p-r rounds of
    (F, B, W) on the second chunk; steady rounds of F, B, W on each chunk; cool down with B's,
    then the W's held back. It needs m >= 2p - 1 micro-batches.
    """

    name = "zbv"
    backward_in_step = True
    split_backward = True
    virtual_stages: ClassVar[int] = 2

    def __init__(self, num_microbatches: int, num_partitions: int) -> None:
        super().__init__(num_microbatches, num_partitions)
        p = self.num_ranks
        if num_microbatches < 2 * p - 1:
            raise ValueError(f"schedule='zbv' needs at least 2p - 1 = {2 * p - 1} micro-batches at pipeline "
                             f"depth {p}, got num_microbatches={num_microbatches}")

    def rank_of(self, partition: int) -> int:
        p = self.num_ranks
        return partition if partition < p else 2 * p - 1 - partition

    def rank_actions(self, rank: int) -> list[Action]:
        p, m = self.num_ranks, self.num_microbatches
        down, up = rank, 2 * p - 1 - rank
        count = {("F", down): 0, ("F", up): 0, ("B", down): 0, ("B", up): 0, ("W", down): 0, ("W", up): 0}
        out: list[Action] = []

        def add(kind: Literal["F", "B", "W"], j: int) -> None:
            out.append(Action(kind, count[(kind, j)], j))
            count[(kind, j)] += 1

        for _ in range(2 * (p - rank) - 1):
            add("F", down)
        for _ in range(rank):
            add("F", up), add("F", down)
        for _ in range(p - rank):
            add("F", up), add("B", up), add("W", up)
        while count[("F", up)] < count[("F", down)] or count[("F", down)] < m:
            if count[("F", down)] < m:
                add("F", down)
            add("B", down), add("W", down), add("F", up), add("B", up), add("W", up)
        for _ in range(rank):
            add("B", down), add("B", up)
        for _ in range(p - rank):
            add("B", down), add("W", down)
        while count[("W", up)] < count[("B", up)]:
            add("W", up)
        while count[("W", down)] < count[("B", down)]:
            add("W", down)
        return out



#: Every schedule, by the name ``schedule=`` takes.
SCHEDULES: dict[str, type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved-1f1b": Interleaved1F1B,
                                         "zb-h1": ZeroBubbleH1, "zbv": ZeroBubbleV}


def schedule_named(name: str, virtual_stages: int | None = None) -> type[Schedule]:
    """The schedule class called ``name``, with ``virtual_stages`` chunks per rank where it
    takes them (interleaved 1F1B: default 2).

    Raises:
        ValueError: an unknown name (the message lists the choices), or ``virtual_stages`` for
            a schedule that holds one partition per rank.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {list(SCHEDULES)}")
    cls = SCHEDULES[name]
    if not issubclass(cls, Interleaved1F1B):
        if virtual_stages not in (None, 1):
            raise ValueError(f"virtual_stages={virtual_stages} needs schedule='interleaved-1f1b'; "
                             f"schedule={name!r} holds one partition per rank")
        return cls
    v = cls.virtual_stages if virtual_stages is None else virtual_stages
    if not isinstance(v, int) or v < 2:
        raise ValueError(f"schedule={name!r} needs virtual_stages >= 2 (chunks per rank), got "
                         f"{virtual_stages}: with 1 it is schedule='1f1b'")
    return cls.with_virtual_stages(v)


def timetable(schedule: Schedule) -> list[dict[int, Action]]:
    """Each clock tick's work, {rank: action}, when every forward and backward takes one tick
    (one partition per rank: {partition: action}).

    A rank runs its next action (in :meth:`Schedule.rank_actions` order) at the first tick where
    its inputs are ready: F(i, j) after F(i, j-1); B(i, j) after B(i, j+1), or after F(i, j) on
    the last partition.

    Raises:
        ValueError: the schedule deadlocks (an action waits for one that never comes first).
    """
    n = schedule.num_partitions
    queues = [schedule.rank_actions(r) for r in range(schedule.num_ranks)]
    done: set[tuple[str, int, int]] = set()
    ticks: list[dict[int, Action]] = []
    while any(queues):
        tick = {r: q[0] for r, q in enumerate(queues) if q and _ready(q[0], n, done)}
        if not tick:
            stuck = {r: str(q[0]) for r, q in enumerate(queues) if q}
            raise ValueError(f"schedule {type(schedule).__name__} deadlocks: next actions {stuck} "
                             f"all wait for work that has not run")
        for r, action in tick.items():
            queues[r].pop(0)
            done.add((action.kind, action.microbatch, action.partition))
        ticks.append(tick)
    return ticks


def timetable_bubble(schedule: Schedule) -> float:
    """The idle fraction of the :func:`timetable`: ticks no rank works, over ranks x ticks."""
    ticks = timetable(schedule)
    busy = sum(len(tick) for tick in ticks)
    return 1 - busy / (schedule.num_ranks * len(ticks))


def _ready(action: Action, n: int, done: set[tuple[str, int, int]]) -> bool:
    i, j = action.microbatch, action.partition
    if action.kind == "F":
        return j == 0 or ("F", i, j - 1) in done
    if action.kind == "W":
        return ("B", i, j) in done
    return ("F", i, j) in done and (j == n - 1 or ("B", i, j + 1) in done)


def format_timetable(schedule: Schedule) -> str:
    """The :func:`timetable` as the ASCII table of :class:`OneFOneB`'s docstring (with virtual
    stages: a row per rank, ``F2.1`` the forward of micro-batch 2 on the rank's chunk 1)."""
    ticks = timetable(schedule)
    virtual = schedule.virtual_stages > 1

    def label(a: Action) -> str:
        return f"{a}.{a.partition // schedule.num_ranks}" if virtual else str(a)

    width = max(3, len(str(len(ticks))) + 1, *(len(label(a)) + 1 for t in ticks for a in t.values()))
    head = "tick | " + "".join(f"{k:<{width}}" for k in range(len(ticks)))
    tag = "r" if virtual else "p"
    rows = [f"{tag}{j:<3} | " + "".join(f"{label(t[j]) if j in t else '':<{width}}" for t in ticks)
            for j in range(schedule.num_ranks)]
    return "\n".join([head.rstrip(), "-----+" + "-" * (len(head) - 6), *(r.rstrip() for r in rows)])
