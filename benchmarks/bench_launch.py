"""Starting an 8-rank gloo group: goose.spawn (fork) beside torch.multiprocessing's spawn method, paired."""

from __future__ import annotations

import os
import time

import torch.multiprocessing as tmp

from benchmarks.paired import alternate
from benchmarks.results import Record
from goose_core import ParallelContext, spawn
from goose_core.distributed import free_port

WORLD = 8
#: A torch spawn start takes seconds (8 fresh interpreters import torch), so few rounds: with 5
#: the interval is the smallest to the largest ratio (94% coverage).
ROUNDS = 5


def _body() -> None:
    ParallelContext(data_parallel_size=WORLD).destroy()


def _peer_body(rank: int, port: int) -> None:
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
    # No warm-up round: nothing is cached between starts but the files, already read by now.
    pairs = alternate(_goose, _peer, ROUNDS, warmup=0)
    return [Record.timed("launch", f"start {WORLD} gloo ranks + ParallelContext, {ROUNDS} rounds", pairs,
                         "torch.multiprocessing spawn")]
