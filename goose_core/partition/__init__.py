"""Choosing how many consecutive blocks each pipeline stage holds: uniform, explicit, by time, by memory."""

from goose_core.partition.plan import PartitionPlan, Partitioner, partition_blocks, plan_partition
from goose_core.partition.profile import ADAM_FACTOR, BlockFn, block_memory, profile_memory, profile_times
from goose_core.partition.solve import ImbalanceWarning, solve, stage_costs

__all__ = [
    "ADAM_FACTOR",
    "BlockFn",
    "ImbalanceWarning",
    "PartitionPlan",
    "Partitioner",
    "block_memory",
    "partition_blocks",
    "plan_partition",
    "profile_memory",
    "profile_times",
    "solve",
    "stage_costs",
]

#: The old name of :class:`PartitionPlan` (``goose_core.pipeline`` calls a stage's share of the
#: executor a ``Partition``); kept so code written before the rename still imports.
Partition = PartitionPlan
