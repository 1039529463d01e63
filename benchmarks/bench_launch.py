"""Starting an 8-rank gloo group: goose.spawn (fork) beside torch.multiprocessing's spawn method."""

from __future__ import annotations

import statistics
import time

import torch.multiprocessing as tmp

from benchmarks.results import Record
from goose_core import ParallelContext, spawn
from goose_core.distributed import free_port

WORLD = 8
REPEATS = 3


def _body() -> None:
    ParallelContext(data_parallel_size=WORLD).destroy()


def _peer_body(rank: int, port: int) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _body()


def _goose() -> float:
    start = time.perf_counter()
    spawn(_body, WORLD, timeout=300)
    return time.perf_counter() - start


def _peer() -> float:
    start = time.perf_counter()
    tmp.start_processes(_peer_body, args=(free_port(),), nprocs=WORLD, start_method="spawn")
    return time.perf_counter() - start


def run() -> list[Record]:
    goose = statistics.median(_goose() for _ in range(REPEATS))
    peer = statistics.median(_peer() for _ in range(REPEATS))
    return [Record("launch", f"start {WORLD} gloo ranks + ParallelContext, median of {REPEATS}",
                   goose, peer, "torch.multiprocessing spawn")]
