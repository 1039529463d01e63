"""Progress records: each rank's step and last activity, published to the store for its peers.

When a collective times out or a peer's connection closes, torch tells a rank only that *it*
waited. :mod:`goose_core.distributed.missing` reads these records to say which rank did not
arrive and what it did last. The cost per operation must stay negligible, so nothing here talks
to the network on the training path:

* A note (:func:`note`) is two attribute writes; its text is formatted only when published.
* A daemon thread publishes the record to the process group's store every ``INTERVAL`` seconds
  (one small ``set``), with a heartbeat: a record whose beat stops belongs to a process that is
  gone or frozen. The thread runs while the main thread waits inside a collective (torch
  releases the GIL there), so a rank stuck in a collective still beats.
* Which operations a rank has issued is torch's own count: every process group numbers its
  collectives and point-to-point operations on each member
  (``ProcessGroup._get_sequence_number_for_group``, the number c10d's flight recorder files
  entries under), so a member whose count is behind did not arrive. Reading it costs nothing.
* On exit (``atexit``, and multiprocessing's finaliser for forked ranks) the record says so, so
  a rank that leaves while its peers wait is named as having left.

The step is the number of forwards of the wrapped model (:func:`count_forwards`): one per
training step without gradient accumulation.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing.util
import os
import socket
import threading
import time
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

__all__ = ["Progress", "INTERVAL", "record_key", "start", "current", "note", "count_forwards"]

#: Seconds between two publications of a rank's record (and two heartbeats).
INTERVAL = 0.5


def record_key(rank: int) -> str:
    """The store key of ``rank``'s progress record."""
    return f"goose/progress/{rank}"


class Progress:
    """One rank's record: step, last activity, torch's operation counts, and how it ended.

    Args:
        store: the process group's store (every rank's record lives there).
        rank: this rank's global rank.
        where: its coordinates, e.g. ``"tp 0, pp 1, dp 0"``.
        groups: the process groups whose operation counts are published.
        timeout: the groups' timeout (quoted in the errors).
        interval: seconds between publications.
    """

    def __init__(self, store: dist.Store, rank: int, where: str, groups: list[dist.ProcessGroup],
                 timeout: timedelta, interval: float = INTERVAL) -> None:
        self.store, self.rank, self.where, self.timeout, self.interval = store, rank, where, timeout, interval
        self.groups = {g.group_name: g for g in groups}  # names agree on every rank
        self.step, self.activity, self.since = 0, ("started",), time.time()
        self.state = "running"  # or "failed": it gave up waiting (a consequence, not a cause)
        self.end: str | None = None  # how the process ended, once it has
        self.waited: dict[str, Any] | None = None  # what it gave up waiting on, if it did
        self.beat, self.pid = 0, os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="goose-progress", daemon=True)

    def start(self) -> Progress:
        self.publish()
        self._thread.start()
        atexit.register(self.close, "exited")
        # Forked ranks (goose_core.spawn, torch.multiprocessing) leave through multiprocessing's
        # own exit path, which runs its finalisers but not atexit.
        multiprocessing.util.Finalize(None, self.close, args=("exited",), exitpriority=100)
        return self

    def seqs(self) -> dict[str, int]:
        """torch's operation count of each group, by the group's name."""
        counts = {}
        for key, group in self.groups.items():
            try:
                counts[key] = int(group._get_sequence_number_for_group())
            except (RuntimeError, AttributeError):  # a backend that does not count
                pass
        return counts

    def record(self) -> dict[str, Any]:
        what, *args = self.activity
        return {"rank": self.rank, "where": self.where, "host": socket.gethostname(), "pid": self.pid,
                "beat": self.beat, "time": time.time(), "step": self.step,
                "activity": what.format(*args), "since": self.since, "state": self.state,
                "end": self.end, "waited": self.waited, "seq": self.seqs()}

    def publish(self) -> bool:
        """Write the record to the store; False once the store is gone (nothing to publish to)."""
        self.beat += 1
        try:
            self.store.set(record_key(self.rank), json.dumps(self.record()))
            return True
        except Exception:  # noqa: BLE001 - the store's host exited: peers cannot read it either
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.publish():
                return

    def fail(self, activity: str, waited: dict[str, Any]) -> None:
        """This rank gave up waiting (on ``waited``: ranks, group name, pipeline or not):
        published at once, so peers take it for a waiter, not a cause, and follow it."""
        self.state, self.activity, self.since, self.waited = "failed", (activity,), time.time(), waited
        self.publish()

    def close(self, how: str) -> None:
        """The last record: ``how`` the rank ended (context destroyed, process exited)."""
        if self.end is not None or os.getpid() != self.pid:  # once; never from a forked child
            return
        if how == "exited":
            how = ("exited without destroying the process group" if dist.is_initialized()
                   else "exited after destroying the process group")
        self.end = how
        self._stop.set()
        # The thread may be inside the store's C++ client: let it leave before this process goes
        # on to tear the process group (and the store) down, or exits, under it (an abort).
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval)
        self.publish()


_current: Progress | None = None


def start(store: dist.Store, rank: int, where: str, groups: list[dist.ProcessGroup],
          timeout: timedelta, interval: float = INTERVAL) -> Progress:
    """Begin publishing this rank's record (a later context replaces an earlier one)."""
    global _current
    if _current is not None and _current.end is None:
        _current._stop.set()
    _current = Progress(store, rank, where, groups, timeout, interval).start()
    return _current


def current() -> Progress | None:
    """This process's record, or None before a ParallelContext exists."""
    return _current


def note(what: str, *args: Any) -> None:
    """Record the current activity: ``what.format(*args)``, formatted only when published."""
    progress = _current
    if progress is not None:
        progress.activity, progress.since = (what, *args), time.time()


_counted: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def count_forwards(model: nn.Module) -> None:
    """Count the model's forwards as the record's step (once per model, whichever wrapper asks)."""
    if model in _counted:
        return
    _counted.add(model)
    model.register_forward_pre_hook(_forward_started)


def _forward_started(module: nn.Module, args: Any) -> None:
    progress = _current
    if progress is not None:
        progress.step += 1
        progress.activity, progress.since = ("forward",), time.time()
