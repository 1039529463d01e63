"""Pipeline callbacks: functions fired before and after every forward, backward and recompute.

The executor fires an :class:`Event` on each side of the work of one (micro-batch, partition)
cell; each registered :class:`Callback` whose filters match is called with it. Nothing here knows
about the executor: it only calls :meth:`CallbackList.fire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal

from goose_core.distributed.progress import note

__all__ = ["Kind", "Phase", "Event", "Callback", "CallbackList"]

Kind = Literal["forward", "backward", "recompute", "weight"]  # weight: W of a split backward
Phase = Literal["before", "after"]


@dataclass(frozen=True)
class Event:
    """Which work is starting or ending: ``kind`` of micro-batch ``microbatch_idx`` on partition
    (pipeline stage) ``partition_idx``."""

    kind: Kind
    phase: Phase
    microbatch_idx: int
    partition_idx: int


class Callback:
    """Call ``function(event)`` for matching events. A filter of None matches every index.

    Args:
        function: called with the :class:`Event`.
        microbatch_idx: only this micro-batch (None: all).
        partition_idx: only this partition (None: all).
        kinds: only these kinds of work (None: all).
    """

    def __init__(self, function: Callable[[Event], None], microbatch_idx: int | None = None,
                 partition_idx: int | None = None, kinds: Iterable[Kind] | None = None) -> None:
        self.function = function
        self.microbatch_idx = microbatch_idx
        self.partition_idx = partition_idx
        self.kinds = frozenset(kinds) if kinds is not None else None

    def matches(self, event: Event) -> bool:
        return ((self.microbatch_idx is None or self.microbatch_idx == event.microbatch_idx)
                and (self.partition_idx is None or self.partition_idx == event.partition_idx)
                and (self.kinds is None or event.kind in self.kinds))

    def __call__(self, event: Event) -> None:
        if self.matches(event):
            self.function(event)


class CallbackList:
    """The callbacks registered on one pipeline, fired in registration order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def add(self, callback: Callback) -> Callback:
        self.callbacks.append(callback)
        return callback

    def remove(self, callback: Callback) -> None:
        self.callbacks.remove(callback)

    def fire(self, kind: Kind, phase: Phase, microbatch_idx: int, partition_idx: int) -> None:
        """Call every matching callback; an exception propagates to the caller unchanged."""
        note("pipeline {} of micro-batch {} on stage {} ({})", kind, microbatch_idx, partition_idx,
             "started" if phase == "before" else "done")  # the rank's last activity for its peers
        if not self.callbacks:
            return
        event = Event(kind, phase, microbatch_idx, partition_idx)
        for callback in self.callbacks:
            callback(event)
