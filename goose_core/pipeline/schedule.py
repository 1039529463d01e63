"""Pipeline schedules as data: which (micro-batch, partition) cells run at each clock cycle."""

from __future__ import annotations

from abc import ABC, abstractmethod

__all__ = ["Cell", "clock_cycles", "Schedule", "GPipe"]

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


class Schedule(ABC):
    """The order of work on every partition, forward and backward.

    The executor runs :meth:`forward_cells` in order; the backward order is enforced inside
    autograd by virtual dependencies (see :mod:`goose_core.pipeline.dependency`), one edge
    between each pair of consecutive cells of :meth:`backward_order`. Each partition's backward
    order must therefore visit micro-batches in reverse forward order, as GPipe does; 1F1B, which
    runs backward cells during the forward, needs cells tagged forward/backward as well.
    """

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


class GPipe(Schedule):
    """All forwards by clock cycle, then all backwards, each partition in reverse micro-batch order::

        forward  F0 F1 F2 F3               backward  B3 B2 B1 B0     (one partition)
    """

    def forward_cells(self) -> list[Cell]:
        return [cell for clock in clock_cycles(self.num_microbatches, self.num_partitions) for cell in clock]

    def backward_order(self, partition: int) -> list[int]:
        return list(reversed(range(self.num_microbatches)))
