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

:func:`messages` lists them, per neighbour, as each partition issues them; the transport
(:mod:`.p2p`) issues exactly that list, and a pure test checks that the two sides of every
boundary list the same messages for every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from goose_core.engine.schedule import Schedule, timetable

__all__ = ["Message", "Kind", "messages", "forward_order"]

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


def forward_order(schedule: Schedule, partition: int) -> list[int]:
    """The micro-batches whose forward runs on ``partition``, in the order they run."""
    return [a.microbatch for a in schedule.actions(partition) if a.kind == "F"]


def messages(schedule: Schedule, partition: int, requires_grad: bool = True) -> dict[int, list[Message]]:
    """{neighbour partition: the messages ``partition`` sends to or receives from it, in issue order}.

    Each boundary's messages are ordered by the tick of :func:`~.schedule.timetable` at which
    their sender produces them (activation i: forward (i, j); gradient i: backward (i, j+1));
    at a tie the activation goes first. Both sides can follow that order: when a side's program
    needs a message before it produces another, the needed one was produced at an earlier tick.
    A step without gradients (``requires_grad=False``) has no gradient messages.

    Raises:
        ValueError: ``partition`` is not in ``[0, schedule.num_partitions)``.
    """
    n = schedule.num_partitions
    if not 0 <= partition < n:
        raise ValueError(f"partition {partition} is not in [0, {n}) for a {n}-partition schedule")
    produced: list[tuple[int, int, Message]] = []  # (tick, activations first, message)
    for tick, work in enumerate(timetable(schedule)):
        for j, action in work.items():
            if action.kind == "F" and j + 1 < n:
                produced.append((tick, 0, Message("activation", action.microbatch, j, j + 1)))
            elif action.kind == "B" and j > 0 and requires_grad:
                produced.append((tick, 1, Message("gradient", action.microbatch, j, j - 1)))
    plan: dict[int, list[Message]] = {}
    for peer in (partition - 1, partition + 1):
        if 0 <= peer < n:
            low = min(peer, partition)
            crossing = [msg for _, _, msg in sorted(produced, key=lambda p: p[:2])
                        if {msg.src, msg.dst} == {low, low + 1}]
            plan[peer] = [Message("header", -1, low, low + 1)] + crossing
    return plan
