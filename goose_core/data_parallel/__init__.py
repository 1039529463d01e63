"""Data parallelism: bucketed gradient averaging that overlaps the backward pass."""

from goose_core.data_parallel.bucket import Bucket, build_buckets, main_dtype
from goose_core.data_parallel.loss import PendingMean, count_items_over, global_mean
from goose_core.data_parallel.reducer import GradReducer
from goose_core.data_parallel.replicas import broadcast_replicas, check_replicas
from goose_core.data_parallel.wrapper import DataParallel, no_sync, parameters_changed, reducer_of
from goose_core.data_parallel.zero3 import gathered

__all__ = [
    "Bucket",
    "DataParallel",
    "GradReducer",
    "PendingMean",
    "broadcast_replicas",
    "build_buckets",
    "check_replicas",
    "count_items_over",
    "gathered",
    "global_mean",
    "main_dtype",
    "no_sync",
    "parameters_changed",
    "reducer_of",
]
