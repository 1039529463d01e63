"""Streams: CUDA streams on GPUs, and a no-op stand-in on CPU so the same code runs in CI.

Compute runs on each device's default stream; copies between partitions run on their own copy
streams. Two rules keep that correct on a GPU:

* ``wait_stream(a, b)``: work queued on ``a`` from now on starts after what ``b`` has queued,
  e.g. a copy waits for the compute that produced its input.
* ``record_stream(t, s)``: tell the caching allocator that ``t`` is used on ``s`` too, so
  freeing ``t`` on its own stream does not hand its memory out while ``s`` still reads it.

On CPU every operation is synchronous, so a :class:`CPUStream` does nothing, except that
:func:`trace_waits` can record each ``wait_stream`` call, which is how the tests check that the
waits come in the right order without a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import Tensor

__all__ = ["CPUStream", "AbstractStream", "new_stream", "current_stream", "default_stream",
           "use_stream", "get_device", "wait_stream", "record_stream", "trace_waits"]


class CPUStream:
    """A stand-in for a CUDA stream on CPU. ``name`` only labels it in traces."""

    device = torch.device("cpu")

    def __init__(self, name: str = "cpu") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"CPUStream({self.name!r})"


AbstractStream = Union[torch.cuda.Stream, CPUStream]

_DEFAULT_CPU = CPUStream("default")
_trace: list[tuple[str, str]] | None = None


def new_stream(device: torch.device, name: str = "copy") -> AbstractStream:
    """A new stream on ``device`` (a labelled CPUStream on CPU)."""
    if device.type != "cuda":
        return CPUStream(name)
    return torch.cuda.Stream(device)


def current_stream(device: torch.device) -> AbstractStream:
    """The stream work is queued on right now."""
    if device.type != "cuda":
        return _DEFAULT_CPU
    return torch.cuda.current_stream(device)


def default_stream(device: torch.device) -> AbstractStream:
    """The device's default (compute) stream."""
    if device.type != "cuda":
        return _DEFAULT_CPU
    return torch.cuda.default_stream(device)


@contextmanager
def use_stream(stream: AbstractStream) -> Iterator[None]:
    """Queue work on ``stream`` inside the block."""
    if isinstance(stream, CPUStream):
        yield
        return
    with torch.cuda.stream(stream):
        yield


def get_device(stream: AbstractStream) -> torch.device:
    return stream.device


def _label(stream: AbstractStream) -> str:
    return stream.name if isinstance(stream, CPUStream) else repr(stream)


def wait_stream(source: AbstractStream, target: AbstractStream) -> None:
    """Work queued on ``source`` from now on waits for the work already queued on ``target``."""
    if _trace is not None:
        _trace.append((_label(source), _label(target)))
    if isinstance(source, CPUStream) or isinstance(target, CPUStream):
        return
    source.wait_stream(target)


def record_stream(tensor: Tensor, stream: AbstractStream) -> None:
    """Keep ``tensor``'s memory from reuse until the work queued on ``stream`` so far is done."""
    if isinstance(stream, CPUStream) or not tensor.is_cuda:
        return
    tensor.record_stream(stream)


@contextmanager
def trace_waits() -> Iterator[list[tuple[str, str]]]:
    """Record every ``wait_stream(source, target)`` as ``(source label, target label)``."""
    global _trace
    old, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = old
