"""Choosing how many consecutive blocks each pipeline stage holds, and what each stage will cost.

::

    blocks   b0  b1  b2  b3  b4  b5  b6  b7        "time": profile each block (fwd+bwd seconds),
    cost      1   1   4   1   1   1   4   1        then the exact min-max split of that sequence
             └──┬──┘ └┬┘ └────┬────┘ └──┬──┘
    stages     s0    s1      s2       s3           counts [2, 1, 3, 2], stage costs 2 4 3 5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist
from torch import Tensor

from goose_core.partition.profile import ADAM_FACTOR, BlockFn, profile_memory, profile_times
from goose_core.partition.solve import check_costs, solve, stage_costs

__all__ = ["Partitioner", "PartitionPlan", "plan_partition", "partition_blocks"]

logger = logging.getLogger("goose_core.partition")

#: "uniform", "time", "memory", or an explicit list of block counts per stage.
Partitioner = str | Sequence[int]

_UNITS = {"uniform": "blocks", "explicit": "blocks", "time": "s", "memory": "bytes"}


@dataclass(frozen=True)
class PartitionPlan:
    """A split of ``len(block_costs)`` blocks into stages, and the cost it predicts per stage.

    Attributes:
        counts: consecutive blocks per stage.
        partitioner: "uniform", "explicit", "time" or "memory".
        block_costs: the cost of each block (1 per block for "uniform" and "explicit").
        unit: "blocks", "s" (forward + backward seconds of one micro-batch) or "bytes".
    """

    counts: list[int]
    partitioner: str
    block_costs: list[float]
    unit: str

    @property
    def stage_costs(self) -> list[float]:
        """The predicted cost of each stage."""
        return stage_costs(self.block_costs, self.counts)

    @property
    def imbalance(self) -> float:
        """The costliest stage over the mean stage: 1.0 is perfect balance."""
        costs = self.stage_costs
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def table(self, measured: Sequence[float] | None = None, measured_unit: str | None = None) -> str:
        """Each stage's blocks and predicted cost, beside ``measured`` costs if given (e.g. the busy
        seconds per stage that a timeline recorded), each also as a share of its column's total."""
        rows = [f"{'stage':>5}  {'blocks':>6}  {'predicted':>12}  {'share':>6}"]
        if measured is not None:
            rows[0] += f"  {'measured':>12}  {'share':>6}"
        predicted = self.stage_costs
        for s, (count, cost) in enumerate(zip(self.counts, predicted)):
            row = f"{s:>5}  {count:>6}  {_fmt(cost, self.unit):>12}  {_share(cost, predicted):>6}"
            if measured is not None:
                got = _fmt(measured[s], measured_unit or self.unit)
                row += f"  {got:>12}  {_share(measured[s], measured):>6}"
            rows.append(row)
        return "\n".join(rows)

    def __str__(self) -> str:
        return (f"{self.partitioner} partition {self.counts} (imbalance {self.imbalance:.2f}x)\n"
                f"{self.table()}")


def plan_partition(num_blocks: int, num_stages: int, partitioner: Partitioner = "uniform", *,
                   block_fns: Sequence[BlockFn] | None = None, sample: Tensor | None = None,
                   num_microbatches: int = 1, optimizer_factor: float = ADAM_FACTOR, repeat: int = 5,
                   group: dist.ProcessGroup | None = None) -> PartitionPlan:
    """Split ``num_blocks`` blocks into ``num_stages`` stages and predict each stage's cost.

    Args:
        partitioner: "uniform" (equal counts, earlier stages take the remainder), "time" (balance
            forward + backward seconds), "memory" (balance activation + parameter bytes), or an
            explicit list of block counts.
        block_fns: for "time" and "memory", the blocks as callables ``hidden -> hidden``.
        sample: for "time" and "memory", one micro-batch of hidden states entering the first block.
        num_microbatches: "memory" only: GPipe holds this many micro-batches' activations.
        optimizer_factor: "memory" only: bytes of training state per parameter byte (4: AdamW).
        repeat: "time" only: timed runs per block (the fastest counts).
        group: for "time" and "memory", the ranks that must agree on the split, all of which call
            this (default: every rank, once ``torch.distributed`` is initialised). Every rank
            profiles, then the group's first rank's costs are broadcast to all (measured times
            differ from rank to rank, and different splits would wire the pipeline wrongly).
            With tensor or data parallelism too, every pipeline of the grid must hold the same
            split, so the whole world (the default), not one pipeline group, has to agree.

    Raises:
        ValueError: fewer blocks than stages, an unknown partitioner, an explicit list of the
            wrong length, with a zero, or with the wrong sum, or "time"/"memory" without
            ``block_fns`` (one per block) and ``sample``, or a bad ``repeat``,
            ``num_microbatches`` or ``optimizer_factor``. Raised on every rank, before any
            collective.
    """
    check_costs([0.0] * num_blocks, num_stages)
    if not isinstance(partitioner, str):
        counts = _explicit(partitioner, num_blocks, num_stages)
        return PartitionPlan(counts, "explicit", [1.0] * num_blocks, "blocks")
    if partitioner == "uniform":
        return PartitionPlan(_uniform(num_blocks, num_stages), "uniform", [1.0] * num_blocks, "blocks")
    if partitioner not in ("time", "memory"):
        raise ValueError(f"unknown partitioner {partitioner!r}; use 'uniform', 'time', 'memory' or a "
                         f"list of block counts")
    # Every check before any collective (tensor-parallel blocks run some inside the profile).
    _check_profile_inputs(partitioner, num_blocks, block_fns, sample)
    if repeat < 1 or num_microbatches < 1 or optimizer_factor < 0:
        raise ValueError(f"repeat and num_microbatches must be >= 1 and optimizer_factor >= 0, got "
                         f"{repeat}, {num_microbatches} and {optimizer_factor}")
    assert block_fns is not None and sample is not None

    def measure() -> list[float]:
        if partitioner == "time":
            return profile_times(block_fns, sample, repeat=repeat)
        return profile_memory(block_fns, sample, num_microbatches, optimizer_factor)

    # Every rank measures, even though only the first rank's costs are kept: a block sharded by
    # tensor parallelism runs collectives inside, and its tp peers must run it alongside.
    costs = _agree(measure(), group)
    partition = PartitionPlan(solve(costs, num_stages), partitioner, costs, _UNITS[partitioner])
    logger.info("%s", partition)
    return partition


def partition_blocks(num_blocks: int, num_stages: int, partitioner: Partitioner = "uniform",
                     **kwargs: object) -> list[int]:
    """How many consecutive blocks each of ``num_stages`` stages holds (sums to ``num_blocks``):
    ``plan_partition(...).counts``, with the same arguments and errors."""
    return plan_partition(num_blocks, num_stages, partitioner, **kwargs).counts  # type: ignore[arg-type]


def _uniform(num_blocks: int, num_stages: int) -> list[int]:
    # Earlier stages take the remainder: the last stage also carries the head and the loss.
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def _explicit(partitioner: Sequence[int], num_blocks: int, num_stages: int) -> list[int]:
    counts = list(partitioner)
    if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(f"explicit partition {counts} must give each of {num_stages} stages at least one "
                         f"block and sum to {num_blocks}")
    return counts


def _check_profile_inputs(partitioner: str, num_blocks: int, block_fns: Sequence[BlockFn] | None,
                          sample: Tensor | None) -> None:
    if block_fns is None or sample is None:
        raise ValueError(f"partitioner {partitioner!r} profiles the blocks: pass block_fns (one callable "
                         f"hidden -> hidden per block) and sample (one micro-batch of hidden states)")
    if len(block_fns) != num_blocks:
        raise ValueError(f"partitioner {partitioner!r} got {len(block_fns)} block_fns for {num_blocks} "
                         f"blocks: give one per block")


def _agree(costs: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """Every rank of ``group`` takes the group's first rank's costs, so all compute one split."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return costs
    group = group if group is not None else dist.group.WORLD
    box = [costs]
    # Objects, not a tensor: works on gloo and NCCL alike.
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.2f} ms"
    if unit == "bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    return f"{value:g}"


def _share(value: float, column: Sequence[float]) -> str:
    total = sum(column)
    return f"{value / total:.0%}" if total > 0 else "-"
