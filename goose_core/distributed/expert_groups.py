"""The expert-parallel groups: EP ranks carved from each data-parallel line, and the ranks that hold the same experts.

Megatron's layout: each data-parallel line of the grid (the ranks that differ in ``dp`` only) is
cut into runs of ``E`` neighbouring dp ranks. A run is one expert-parallel (EP) group: its ranks
hold different experts and exchange tokens with all-to-all. The ranks at the same place in every
run hold the same experts: they form one expert-data-parallel (EDP) group, over which expert
gradients are reduced (dense weights stay on the whole dp group)::

    dp = 4, E = 2 (tp = pp = 1)          dp rank   0     1     2     3
                                         EP group  [ A  ,  A ] [ B  ,  B ]
                                         experts   0-1   2-3   0-1   2-3
                                         EDP group  x     y     x     y

    EP groups: {0, 1}, {2, 3}     EDP groups: {0, 2} (experts 0-1), {1, 3} (experts 2-3)

Pure rank arithmetic (:func:`expert_lines`) plus the process groups (:class:`ExpertGroups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from goose_core.distributed.grid import ProcessGrid

__all__ = ["check_expert_parallel_size", "expert_lines", "ExpertGroups"]


def check_expert_parallel_size(size: object, dp: int) -> None:
    """Raise ValueError unless ``size`` is an integer >= 1 that divides ``dp``."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"expert_parallel_size must be an integer >= 1, got {size!r}")
    if dp % size:
        raise ValueError(f"expert_parallel_size={size} does not divide data_parallel_size={dp}: the "
                         f"expert-parallel groups are carved from the data-parallel ranks; choose a "
                         f"divisor of {dp}")


def expert_lines(grid: ProcessGrid, size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Every EP group and every EDP group of ``grid`` at expert-parallel size ``size``, in a fixed order."""
    ep, edp = [], []
    for line in grid.all_groups("dp"):
        ep += [line[i:i + size] for i in range(0, len(line), size)]
        edp += [line[j::size] for j in range(size)]
    return ep, edp


@dataclass
class ExpertGroups:
    """This rank's EP and EDP groups (created collectively: every rank calls :meth:`create`).
    At ``size`` 1 no group is created: the EP group is None and the EDP group is the dp group."""

    size: int
    rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup
    ep_ranks: list[int]
    edp_ranks: list[int]

    @classmethod
    def create(cls, grid: ProcessGrid, size: int, rank: int, dp_group: dist.ProcessGroup,
               timeout: timedelta) -> ExpertGroups:
        ep_lines, edp_lines = expert_lines(grid, size)
        if size == 1:
            dp_line = next(line for line in edp_lines if rank in line)
            return cls(1, 0, None, dp_group, [rank], dp_line)
        groups = {}
        for kind, lines in (("ep", ep_lines), ("edp", edp_lines)):
            for ranks in lines:
                group = dist.new_group(ranks, timeout=timeout)  # collective: every rank, every line
                if rank in ranks:
                    groups[kind] = (group, ranks)
        (ep, ep_ranks), (edp, edp_ranks) = groups["ep"], groups["edp"]
        return cls(size, ep_ranks.index(rank), ep, edp, ep_ranks, edp_ranks)
