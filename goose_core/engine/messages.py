"""The point-to-point messages of a step, derived from the schedule: NCCL's order, not tags.

NCCL ignores the ``tag`` of ``isend``/``irecv``: it matches the sends of one rank to the
receives of its peer in the order each side issues them, and a receive posted early occupies
that pair's stream. So both sides of every pipeline boundary must issue the *same* list of
messages in the *same* order. That list is a function of the schedule, which is data::

    partition j                                             partition j+1
      send header (shapes, dtype: once per step) ════════►   recv header
    F(i): send activation i ═════════════════════════════►   recv activation i: F(i)
    B(k): recv gradient k ◄══════════════════════════════   send gradient k: B(k)

in one order both sides agree on: by the clock tick of :func:`~.schedule.timetable` at which the
sender produces each message. For GPipe that is every activation, then every gradient; for 1F1B
the two interleave (at p=2, M=3: act 0, act 1, grad 0, act 2, grad 1, grad 2).

NCCL matches per *pair of ranks*, not per boundary. With virtual stages (interleaved 1F1B) a
rank holds several partitions and one pair of ranks carries several boundaries, in both
directions at p=2 (rank 0 -> 1 for partitions 0|1 and 2|3, rank 1 -> 0 for 1|2), and ranks p-1
and 0 become neighbours. So the list is per pair of ranks: every boundary between the two,
merged in the same tick order, each boundary's header just before its first activation.

:func:`messages` lists them, per neighbour rank, as each rank issues them; the transport
(:mod:`.p2p`) issues exactly that list, and a pure test checks that the two sides of every
pair list the same messages for every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from goose_core.engine.schedule import Schedule, timetable

__all__ = ["Message", "Kind", "messages", "forward_order", "blocked_receives"]

Kind = Literal["header", "activation", "gradient"]


@dataclass(frozen=True)
class Message:
    """One point-to-point message: ``kind`` of ``microbatch`` (-1 for the header) from partition
    ``src`` to partition ``dst``. Messages across one boundary of one kind share a shape."""

    kind: Kind
    microbatch: int
    src: int
    dst: int

    @property
    def key(self) -> tuple[Kind, int]:
        return self.kind, self.microbatch

    @property
    def boundary(self) -> int:
        """The boundary crossed: between partitions ``boundary`` and ``boundary + 1``."""
        return min(self.src, self.dst)

    @property
    def slot(self) -> tuple[Kind, int, int]:
        """What tells the message apart among a pair of ranks' messages: (kind, micro-batch, boundary)."""
        return self.kind, self.microbatch, self.boundary


def forward_order(schedule: Schedule, partition: int) -> list[int]:
    """The micro-batches whose forward runs on ``partition``, in the order they run."""
    return [a.microbatch for a in schedule.actions(partition) if a.kind == "F"]


def messages(schedule: Schedule, rank: int, requires_grad: bool = True) -> dict[int, list[Message]]:
    """{neighbour rank: the messages ``rank`` sends to or receives from it, in issue order}.

    With one partition per rank, ranks are partitions. Each pair's messages are ordered by the
    tick of :func:`~.schedule.timetable` at which their sender produces them (activation i of
    boundary b: forward (i, b); gradient i: backward (i, b+1)); at a tie a header goes first,
    then activations, then gradients, lower boundaries first. Both sides can follow that order:
    when a side's program needs a message before it produces another, the needed one was
    produced at an earlier tick. A step without gradients (``requires_grad=False``) has no
    gradient messages.

    Raises:
        ValueError: ``rank`` is not in ``[0, schedule.num_ranks)``.
    """
    n, p = schedule.num_partitions, schedule.num_ranks
    if not 0 <= rank < p:
        raise ValueError(f"partition {rank} is not in [0, {p}) for a {p}-rank schedule")
    produced: list[tuple[int, int, int, Message]] = []  # (tick, header/activation/gradient, boundary, message)
    headed: set[int] = set()
    for tick, work in enumerate(timetable(schedule)):
        for action in work.values():
            j = action.partition
            if action.kind == "F" and j + 1 < n:
                if j not in headed:
                    headed.add(j)
                    produced.append((tick, 0, j, Message("header", -1, j, j + 1)))
                produced.append((tick, 1, j, Message("activation", action.microbatch, j, j + 1)))
            elif action.kind == "B" and j > 0 and requires_grad:
                produced.append((tick, 2, j - 1, Message("gradient", action.microbatch, j, j - 1)))
    ordered = [msg for *_, msg in sorted(produced, key=lambda t: t[:3])]
    plan: dict[int, list[Message]] = {}
    for msg in ordered:
        ends = {schedule.rank_of(msg.src), schedule.rank_of(msg.dst)}
        if rank in ends and len(ends) == 2:  # one rank on both sides: no message
            plan.setdefault(next(iter(ends - {rank})), []).append(msg)
    return dict(sorted(plan.items()))


def blocked_receives(schedule: Schedule, plan_of: Callable[[Schedule, int], dict[int, list[Message]]] = messages
                     ) -> list[str]:
    """Where a rank following its program would wait forever: empty for a sound plan.

    Walk each rank's :meth:`~.schedule.Schedule.rank_actions`: a message is produced when its
    cell runs, and needed when its cell starts. Issuing in plan order, a receive that waits
    behind one of this rank's own sends not yet produced deadlocks on NCCL, where a pair's
    messages complete in issue order. ``plan_of`` is the plan to check (default :func:`messages`).
    """
    p, n = schedule.num_ranks, schedule.num_partitions
    found = []
    for r in range(p):
        plans = plan_of(schedule, r)
        produced: set[tuple[str, int, int]] = set()
        for a in schedule.rank_actions(r):
            j = a.partition
            need = ("activation", a.microbatch, j - 1) if a.kind == "F" and j > 0 else (
                ("gradient", a.microbatch, j) if a.kind == "B" and j < n - 1 else None)
            peer = schedule.rank_of(j - 1 if a.kind == "F" else j + 1)
            if need is not None and peer != r:  # a boundary within the rank: handed over in memory
                plan = plans[peer]
                k = [msg.slot for msg in plan].index(need)
                blocked = [msg.slot for msg in plan[:k]
                           if schedule.rank_of(msg.src) == r and msg.slot not in produced]
                if blocked:
                    found.append(f"rank {r} needs {need} behind its unsent {blocked}")
            if a.kind == "F" and j < n - 1:
                produced |= {("header", -1, j), ("activation", a.microbatch, j)}
            if a.kind == "B" and j > 0:
                produced.add(("gradient", a.microbatch, j - 1))
    return found
