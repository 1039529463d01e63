"""The process grid: pure rank arithmetic for (tensor, context, pipeline, data) parallelism.

Ranks are laid out with tensor parallelism varying fastest, then context, then data, then
pipeline::

    rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

    tp=2, pp=2, dp=2 (8 ranks)           pipeline stage 0   pipeline stage 1
                                          dp 0    dp 1       dp 0    dp 1
                                tp 0 ->   r0      r2         r4      r6
                                tp 1 ->   r1      r3         r5      r7

Why this order (Megatron's): tensor parallelism all-reduces activations twice per block in
each direction, so its ranks must be neighbours (the same node, NVLink). Data parallelism
talks once per step; pipeline parallelism sends one activation per micro-batch and tolerates
the slowest links, so it goes outermost. Context parallelism (cp: each rank holds a slice of
every sequence, and key/value blocks travel around the cp ring in every attention layer) talks
more than dp and less than tp, so it sits between them (Megatron's tp-cp-dp-pp)::

    tp=2, cp=2, dp=2 (8 ranks)         dp 0              dp 1
                                      cp 0    cp 1      cp 0    cp 1
                            tp 0 ->   r0      r2        r4      r6
                            tp 1 ->   r1      r3        r5      r7

For the weights, cp is one more replica axis: the ranks of a cp group hold the same
parameters (of their tp shard and pp stage), so gradients are averaged over dp x cp
(:meth:`ProcessGrid.replica_ranks`). cp = 1 gives the 3D grid unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

__all__ = ["Axis", "AXES", "ProcessGrid", "layouts"]

Axis = Literal["tp", "cp", "pp", "dp"]
AXES: tuple[Axis, ...] = ("tp", "cp", "pp", "dp")


@dataclass(frozen=True)
class ProcessGrid:
    """Rank <-> coordinate maths for a tp x cp x pp x dp grid. No processes involved."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1  # last, so every positional (tp, pp, dp) call keeps its meaning

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{axis} size must be an integer >= 1, got {size!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def check_world_size(self, world_size: int) -> None:
        """Raise a clear error if this grid does not tile ``world_size`` processes."""
        if self.world_size != world_size:
            names, sizes = "tensor_parallel_size * pipeline_parallel_size * data_parallel_size", \
                f"{self.tp} * {self.pp} * {self.dp}"
            if self.cp > 1:
                names, sizes = names + " * context_parallel_size", sizes + f" * {self.cp}"
            raise ValueError(
                f"{names} = {sizes} = {self.world_size}, but the world size is "
                f"{world_size}; choose sizes whose product is {world_size} "
                f"(e.g. data_parallel_size={world_size // (self.tp * self.pp * self.cp) or 1}) "
                f"or launch {self.world_size} processes"
            )

    def coords(self, rank: int) -> dict[Axis, int]:
        """The (tp, cp, pp, dp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return {"tp": rank % self.tp, "cp": (rank // self.tp) % self.cp,
                "dp": (rank // (self.tp * self.cp)) % self.dp, "pp": rank // (self.tp * self.cp * self.dp)}

    def rank(self, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """The global rank at the given coordinates."""
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def group_ranks(self, axis: Axis, rank: int) -> list[int]:
        """Global ranks that share every coordinate of ``rank`` except ``axis``."""
        coords = self.coords(rank)
        return [self.rank(**{**coords, axis: i}) for i in range(getattr(self, axis))]

    def all_groups(self, axis: Axis) -> list[list[int]]:
        """Every group along ``axis``, in a fixed order (all ranks must create them alike)."""
        return _distinct(self.group_ranks(axis, rank) for rank in range(self.world_size))

    def replica_ranks(self, rank: int) -> list[int]:
        """Global ranks holding the same weights as ``rank``: its dp x cp plane (same tp, pp),
        dp-major. Gradients are averaged over them."""
        c = self.coords(rank)
        return [self.rank(**{**c, "dp": d, "cp": k}) for d in range(self.dp) for k in range(self.cp)]

    def all_replica_groups(self) -> list[list[int]]:
        """Every dp x cp plane, in a fixed order."""
        return _distinct(self.replica_ranks(rank) for rank in range(self.world_size))

    def pipeline_neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """Global ranks of the previous and next pipeline stage (None at the ends)."""
        c = self.coords(rank)
        prev = self.rank(**{**c, "pp": c["pp"] - 1}) if c["pp"] > 0 else None
        nxt = self.rank(**{**c, "pp": c["pp"] + 1}) if c["pp"] < self.pp - 1 else None
        return prev, nxt


def _distinct(groups: Iterable[list[int]]) -> list[list[int]]:
    seen: dict[tuple[int, ...], None] = {}
    for group in groups:
        seen.setdefault(tuple(group), None)
    return [list(g) for g in seen]


def layouts(world_size: int) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) factorisation of ``world_size``."""
    return [
        (tp, pp, world_size // (tp * pp))
        for tp in range(1, world_size + 1)
        for pp in range(1, world_size + 1)
        if world_size % (tp * pp) == 0
    ]
