"""The 3D process grid: pure rank arithmetic for (tensor, pipeline, data) parallelism.

Ranks are laid out with tensor parallelism varying fastest, then data, then pipeline::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

    tp=2, pp=2, dp=2 (8 ranks)           pipeline stage 0   pipeline stage 1
                                          dp 0    dp 1       dp 0    dp 1
                                tp 0 ->   r0      r2         r4      r6
                                tp 1 ->   r1      r3         r5      r7

Why this order (Megatron's): tensor parallelism all-reduces activations twice per block in
each direction, so its ranks must be neighbours (the same node, NVLink). Data parallelism
talks once per step; pipeline parallelism sends one activation per micro-batch and tolerates
the slowest links, so it goes outermost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Axis", "AXES", "ProcessGrid", "layouts"]

Axis = Literal["tp", "pp", "dp"]
AXES: tuple[Axis, ...] = ("tp", "pp", "dp")


@dataclass(frozen=True)
class ProcessGrid:
    """Rank <-> coordinate maths for a tp x pp x dp grid. No processes involved."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{axis} size must be an integer >= 1, got {size!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def check_world_size(self, world_size: int) -> None:
        """Raise a clear error if this grid does not tile ``world_size`` processes."""
        if self.world_size != world_size:
            raise ValueError(
                f"tensor_parallel_size * pipeline_parallel_size * data_parallel_size = "
                f"{self.tp} * {self.pp} * {self.dp} = {self.world_size}, but the world size is "
                f"{world_size}; choose sizes whose product is {world_size} "
                f"(e.g. data_parallel_size={world_size // (self.tp * self.pp) or 1}) "
                f"or launch {self.world_size} processes"
            )

    def coords(self, rank: int) -> dict[Axis, int]:
        """The (tp, pp, dp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return {"tp": rank % self.tp, "dp": (rank // self.tp) % self.dp, "pp": rank // (self.tp * self.dp)}

    def rank(self, tp: int = 0, pp: int = 0, dp: int = 0) -> int:
        """The global rank at the given coordinates."""
        return pp * (self.dp * self.tp) + dp * self.tp + tp

    def group_ranks(self, axis: Axis, rank: int) -> list[int]:
        """Global ranks that share every coordinate of ``rank`` except ``axis``."""
        coords = self.coords(rank)
        return [self.rank(**{**coords, axis: i}) for i in range(getattr(self, axis))]

    def all_groups(self, axis: Axis) -> list[list[int]]:
        """Every group along ``axis``, in a fixed order (all ranks must create them alike)."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world_size):
            seen.setdefault(tuple(self.group_ranks(axis, rank)), None)
        return [list(g) for g in seen]

    def pipeline_neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """Global ranks of the previous and next pipeline stage (None at the ends)."""
        c = self.coords(rank)
        prev = self.rank(**{**c, "pp": c["pp"] - 1}) if c["pp"] > 0 else None
        nxt = self.rank(**{**c, "pp": c["pp"] + 1}) if c["pp"] < self.pp - 1 else None
        return prev, nxt


def layouts(world_size: int) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) factorisation of ``world_size``."""
    return [
        (tp, pp, world_size // (tp * pp))
        for tp in range(1, world_size + 1)
        for pp in range(1, world_size + 1)
        if world_size % (tp * pp) == 0
    ]
