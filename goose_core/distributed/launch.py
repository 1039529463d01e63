"""Launching ranks from Python: ``spawn`` forks one process per rank, with a deadline.

torchrun is how goose runs in production; ``spawn`` is for tests and notebooks. It forks
(~0.25 s for 8 ranks, against ~7 s for the ``spawn`` start method, which re-imports torch in
every child) and sets the same environment variables torchrun would, so code under test runs
unchanged. Three rules make forking safe and the suite hang-proof:

* Each child runs ``torch.set_num_threads(1)`` before any tensor work. A child forked from a
  parent that already ran a multi-threaded op deadlocks in its own thread pool otherwise; and
  8 ranks on 2 cores are much faster with one thread each.
* Children never touch CUDA: a forked child cannot re-initialise CUDA once the parent has,
  and several ranks must not share one GPU. Each child gets ``GOOSE_BACKEND=gloo`` and
  ``GOOSE_DEVICE=cpu``, so ``ParallelContext()`` picks gloo on the CPU even where CUDA is
  present (an explicit ``ParallelContext(backend=..., device=...)`` still wins).
* The parent watches every child against one deadline. The first rank that raises (or dies)
  takes all the others down, and the error carries that rank's traceback. At the deadline,
  live ranks dump their Python stacks (faulthandler) before they are killed.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from goose_core.distributed.context import BACKEND_ENV, DEVICE_ENV

__all__ = ["spawn", "RankError", "free_port"]


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(obj: Any) -> bytes:
    # torch.save rather than the queue's pickler: tensors would otherwise travel as shared
    # memory handles that die with the child.
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
           kwargs: dict, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        **{BACKEND_ENV: "gloo", DEVICE_ENV: "cpu"},
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        results.put((rank, True, _encode(fn(*args, **kwargs))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        results.close()
        results.join_thread()


def _reap(procs: list[mp.process.BaseProcess], dump_stacks: bool) -> None:
    alive = [p for p in procs if p.is_alive()]
    if dump_stacks and alive:
        for p in alive:
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)
    for p in alive:
        p.kill()
    for p in procs:
        p.join(timeout=5)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
          **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` forked ranks and return their results.

    Each rank sees torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so
    ``ParallelContext(...)`` inside ``fn`` initialises from it, with gloo on the CPU (forked
    ranks never use CUDA, see the module docstring). Results must be picklable.

    Args:
        fn: the per-rank body.
        world_size: number of ranks.
        timeout: seconds for the whole group, start-up included.

    Returns:
        ``fn``'s return value from every rank, in rank order.

    Raises:
        RankError: a rank raised (its traceback is in the message) or died without reporting.
        TimeoutError: the deadline passed; ranks still running are named and their stacks dumped.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, kwargs, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, time.monotonic() + timeout, timeout)
    except TimeoutError:
        _reap(procs, dump_stacks=True)
        raise
    finally:
        _reap(procs, dump_stacks=False)


def _collect(procs: list[mp.process.BaseProcess], results: Any, deadline: float,
             timeout: float) -> list[Any]:
    done: dict[int, Any] = {}
    quiet: dict[int, float] = {}  # rank -> when it was seen gone with exit code 0, no result yet
    while len(done) < len(procs):
        try:
            rank, ok, payload = results.get(timeout=0.05)
        except queue_lib.Empty:
            _check_alive(procs, done, quiet, deadline, timeout)
            continue
        if not ok:
            raise RankError(f"rank {rank} of {len(procs)} failed:\n{payload}")
        done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [done[r] for r in range(len(procs))]


def _check_alive(procs: list[mp.process.BaseProcess], done: dict[int, Any], quiet: dict[int, float],
                 deadline: float, timeout: float) -> None:
    for rank, p in enumerate(procs):
        if rank in done or p.is_alive():
            continue
        if p.exitcode not in (0, None):
            raise RankError(f"rank {rank} of {len(procs)} died with exit code {p.exitcode} "
                            f"before reporting a result")
        # Exit code 0 without a result (os._exit(0)): its result may still be in the pipe, so
        # give the queue a second before naming it.
        if time.monotonic() - quiet.setdefault(rank, time.monotonic()) > 1.0:
            raise RankError(f"rank {rank} of {len(procs)} exited with code 0 before reporting a "
                            f"result (it left early: os._exit?)")
    if time.monotonic() > deadline:
        stuck = [r for r in range(len(procs)) if r not in done]
        raise TimeoutError(f"ranks {stuck} of {len(procs)} did not finish within {timeout:.0f} s "
                           f"(their Python stacks are dumped to stderr above)")
