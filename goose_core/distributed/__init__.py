"""Processes, the 3D grid, its groups, and collectives that autograd understands."""

from goose_core.distributed.collectives import (
    all_gather,
    all_reduce,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    reduce_scatter,
    scatter_to_region,
)
from goose_core.distributed.context import DEFAULT_TIMEOUT, ParallelContext
from goose_core.distributed.grid import AXES, ProcessGrid, layouts
from goose_core.distributed.launch import RankError, free_port, spawn
from goose_core.distributed.missing import MissingRankError
from goose_core.distributed.traffic import Traffic, count_traffic

__all__ = [
    "AXES",
    "DEFAULT_TIMEOUT",
    "MissingRankError",
    "ParallelContext",
    "ProcessGrid",
    "RankError",
    "Traffic",
    "all_gather",
    "all_reduce",
    "copy_to_region",
    "count_traffic",
    "free_port",
    "gather_from_region",
    "layouts",
    "reduce_from_region",
    "reduce_scatter",
    "scatter_to_region",
    "spawn",
]
