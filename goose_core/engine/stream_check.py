"""Why streams need waits: a checker that runs CPU code as a GPU would queue it, and raises on races.

A GPU runs each stream's work in order, but two streams in any order unless one waits for the
other. The checker keeps, for each stream, a count of the operations queued on it and a *vector
clock*: how far into every other stream it has waited (``wait_stream(a, b)`` gives ``a`` all that
``b`` has seen, and ``b``'s own count)::

    compute  ──x = f(..)──●────────────────────── n(compute) = 1
    copy     ─────────────┴wait──y = x.to(..)──── copy has seen compute up to 1: reading x is safe
    copy'    ─────────────────── z = x.to(..)──── copy' never waited: StreamRace (missing wait)

Each tensor's memory remembers the stream and count that wrote it, and which streams read it.
Two mistakes raise :class:`StreamRace`:

* **missing wait**: a stream reads memory written on another stream it has not waited for;
* **missing record_stream**: memory allocated on stream ``a`` comes back for a new tensor on
  ``a`` (the caching allocator reuses a block on its own stream at once) while a read on
  another stream ``u`` was neither waited for by ``a`` nor declared by ``record_stream(t, u)``.

Every operation runs on the current stand-in stream (:func:`.stream.current_stream`); a
partition's compute stream is the CPU's default one (the CPU is one device). Autograd's backward
runs there too, except where the code enters a copy stream, as on a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from goose_core.engine import stream as stream_module
from goose_core.engine.stream import CPUStream, current_stream

__all__ = ["StreamChecker", "StreamRace", "check_streams"]


class StreamRace(RuntimeError):
    """Code that a GPU would run in a racy order."""


@dataclass
class _Memory:
    """What the checker knows of one block of memory (keyed by its address)."""

    allocated_on: CPUStream
    written: tuple[CPUStream, int]  # (stream, its op count) of the last write
    reads: dict[CPUStream, int] = field(default_factory=dict)  # last read per stream
    recorded: set[CPUStream] = field(default_factory=set)  # record_stream(t, s) for these s


class StreamChecker(TorchDispatchMode):
    """A dispatch mode: checks every CPU tensor operation against the waits issued so far."""

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[CPUStream, int] = {}
        self.seen: dict[CPUStream, dict[CPUStream, int]] = {}  # the vector clocks
        self.memory: dict[int, _Memory] = {}

    # -- what the stream helpers report --------------------------------------------------------
    def wait(self, source: CPUStream, target: CPUStream) -> None:
        """``source`` waits for everything queued on ``target`` so far."""
        source, target = source.actual, target.actual
        clock = self.seen.setdefault(source, {})
        for stream, n in self.seen.get(target, {}).items():
            clock[stream] = max(clock.get(stream, 0), n)
        clock[target] = max(clock.get(target, 0), self.count.get(target, 0))

    def record(self, tensor: torch.Tensor, stream: CPUStream) -> None:
        memory = self.memory.get(_address(tensor))
        if memory is not None:
            memory.recorded.add(stream.actual)

    # -- every operation ---------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if stream_module._checker is not self:  # an inner checker has taken over
            return func(*args, **kwargs)
        stream = current_stream(torch.device("cpu")).actual
        n = self.count[stream] = self.count.get(stream, 0) + 1
        inputs = {_address(t): t for t in _tensors((args, kwargs))}
        for address in inputs:
            self._read(address, stream, n, func)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            address = _address(t)
            if address in inputs:  # a view reads; an in-place op writes memory it already read
                if func._schema.is_mutable:
                    self.memory[address].written = (stream, n)
            else:
                self._allocate(address, stream, n, func)
        return out

    def _read(self, address: int, stream: CPUStream, n: int, func: Any) -> None:
        memory = self.memory.get(address)
        if memory is None:  # made before the checker started: nothing to check against
            memory = self.memory[address] = _Memory(stream, (stream, 0))
        writer, k = memory.written
        if writer is not stream and self.seen.get(stream, {}).get(writer, 0) < k:
            raise StreamRace(f"{func} on stream {stream.name!r} reads memory written on stream "
                             f"{writer.name!r} without waiting for it (missing wait_stream)")
        memory.reads[stream] = n

    def _allocate(self, address: int, stream: CPUStream, n: int, func: Any) -> None:
        old = self.memory.get(address)
        if old is not None and old.allocated_on is stream:  # the caching allocator's reuse
            for reader, k in old.reads.items():
                if (reader is not stream and reader not in old.recorded
                        and self.seen.get(stream, {}).get(reader, 0) < k):
                    raise StreamRace(
                        f"{func} on stream {stream.name!r} reuses memory that stream "
                        f"{reader.name!r} may still read (missing record_stream)")
        self.memory[address] = _Memory(stream, (stream, n))


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type == "cpu"
            and t.untyped_storage().nbytes() > 0]


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextmanager
def check_streams() -> Iterator[StreamChecker]:
    """Check every CPU tensor operation inside the block as a GPU would queue it; raises
    :class:`StreamRace`. An inner block takes over from an outer one until it ends."""
    old = stream_module._checker
    checker = stream_module._checker = StreamChecker()
    try:
        with checker:
            yield checker
    finally:
        stream_module._checker = old
