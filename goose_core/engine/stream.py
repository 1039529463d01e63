"""Streams: CUDA streams on GPUs, and a no-op stand-in on CPU so the same code runs in CI.

Compute runs on each device's default stream; copies between partitions run on their own copy
streams. Two rules keep that correct on a GPU:

* ``wait_stream(a, b)``: work queued on ``a`` from now on starts after what ``b`` has queued,
  e.g. a copy waits for the compute that produced its input.
* ``record_stream(t, s)``: tell the caching allocator that ``t`` is used on ``s`` too, so
  freeing ``t`` on its own stream does not hand its memory out while ``s`` still reads it.

On CPU every operation is synchronous, so a :class:`CPUStream` changes no result. It still
plays a GPU's part for two observers: :func:`trace_waits` records each ``wait_stream`` call, and
:func:`~goose_core.engine.stream_check.check_streams` raises where a GPU would race: a stream
reading a tensor before it waited for the stream that wrote it, or memory handed out again while another
stream may still read it (a missing ``record_stream``). The CPU is one device, so its stand-ins
model partitions on *one* GPU: every partition's compute stream is the device's default stream.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from torch import Tensor

__all__ = ["CPUStream", "AbstractStream", "new_stream", "current_stream", "default_stream",
           "use_stream", "get_device", "wait_stream", "record_stream", "trace_waits"]


class CPUStream:
    """A stand-in for a CUDA stream on CPU. ``name`` labels it in traces; ``same_as``: another
    name for that stream (a partition's compute stream is the device's default one)."""

    device = torch.device("cpu")

    def __init__(self, name: str = "cpu", same_as: CPUStream | None = None) -> None:
        self.name = name
        self.actual: CPUStream = same_as.actual if same_as is not None else self

    def __repr__(self) -> str:
        return f"CPUStream({self.name!r})"


AbstractStream = Union[torch.cuda.Stream, CPUStream]

_DEFAULT_CPU = CPUStream("default")
_trace: list[tuple[str, str]] | None = None
_current = threading.local()  # .stack: the CPU stand-ins entered by use_stream, innermost last


def new_stream(device: torch.device, name: str = "copy") -> AbstractStream:
    """A new stream on ``device`` (a labelled CPUStream on CPU)."""
    if device.type != "cuda":
        return CPUStream(name)
    return torch.cuda.Stream(device)


def current_stream(device: torch.device) -> AbstractStream:
    """The stream work is queued on right now."""
    if device.type != "cuda":
        stack = getattr(_current, "stack", None)
        return stack[-1] if stack else _DEFAULT_CPU
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
        # One CPU "device": the innermost stream is current, as on one GPU.
        _current.stack = getattr(_current, "stack", []) + [stream]
        try:
            yield
        finally:
            _current.stack = _current.stack[:-1]
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
        if _checker is not None:
            _checker.wait(source, target)
        return
    source.wait_stream(target)


def record_stream(tensor: Tensor, stream: AbstractStream) -> None:
    """Keep ``tensor``'s memory from reuse until the work queued on ``stream`` so far is done."""
    if isinstance(stream, CPUStream) or not tensor.is_cuda:
        if _checker is not None and isinstance(stream, CPUStream):
            _checker.record(tensor, stream)
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



#: The active checker, set by :func:`goose_core.engine.stream_check.check_streams`.
_checker: Any = None
