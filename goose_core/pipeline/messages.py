"""The point-to-point messages of a step, derived from the schedule: NCCL's order, not tags.

NCCL ignores the ``tag`` of ``isend``/``irecv``: it matches the sends of one rank to the
receives of its peer in the order each side issues them, and a receive posted early occupies
that pair's stream. So both sides of every pipeline boundary must issue the *same* list of
messages in the *same* order. That list is a function of the schedule, which is data::

    partition j                                             partition j+1
    forward  (its forward cells, in order)                  forward  (its cells, in order)
      send header (shapes, dtype: once per step) ════════►   recv header
      send activation i ═════════════════════════════════►   recv activation i
    backward (its backward_order)                           backward (its backward_order)
      recv gradient i ◄══════════════════════════════════   send gradient i

:func:`messages` lists them, per neighbour, as each partition issues them; the transport
(:mod:`.p2p`) issues exactly that list, and a pure test checks that the two sides of every
boundary list the same messages for every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from goose_core.pipeline.schedule import Schedule

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
    return [i for i, j in schedule.forward_cells() if j == partition]


def messages(schedule: Schedule, partition: int, requires_grad: bool = True) -> dict[int, list[Message]]:
    """{neighbour partition: the messages ``partition`` sends to or receives from it, in issue order}.

    A step without gradients (``requires_grad=False``) has no gradient messages.

    Raises:
        ValueError: ``partition`` is not in ``[0, schedule.num_partitions)``.
    """
    n = schedule.num_partitions
    if not 0 <= partition < n:
        raise ValueError(f"partition {partition} is not in [0, {n}) for a {n}-partition schedule")
    prev, next_ = partition - 1, partition + 1
    plan: dict[int, list[Message]] = {k: [] for k in (prev, next_) if 0 <= k < n}
    for i in forward_order(schedule, partition):
        if prev in plan:
            if not plan[prev]:
                plan[prev].append(Message("header", -1, prev, partition))
            plan[prev].append(Message("activation", i, prev, partition))
        if next_ in plan:
            if not plan[next_]:
                plan[next_].append(Message("header", -1, partition, next_))
            plan[next_].append(Message("activation", i, partition, next_))
    if requires_grad:
        for i in schedule.backward_order(partition):
            if next_ in plan:
                plan[next_].append(Message("gradient", i, next_, partition))
            if prev in plan:
                plan[prev].append(Message("gradient", i, partition, prev))
    return plan
