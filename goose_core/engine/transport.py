"""How activations cross a partition boundary: the Transport interface and its in-process kind.

The executor calls :meth:`Transport.send` on a cell's output and :meth:`Transport.recv` for the
next partition's input; it never knows where partitions live. Two transports implement it:

* :class:`LocalTransport` (here): every partition in this process, each on its own device
  (torchgpipe's setting). The autograd graph stays connected; tensors hop devices through
  ``Copy`` on copy streams, fenced by ``Wait``::

      compute_j ─Wait─► copy_j ─wait─► copy_j+1 ═Copy═► ─Wait─► compute_j+1
      (forward: each stream waits for the one on its left; backward: the mirror image)

* :class:`~goose_core.engine.p2p.DistributedTransport`: one partition per rank; the graph is
  cut at the boundary and gradients travel back by point-to-point messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from goose_core.engine.schedule import Schedule
from goose_core.engine.stream import (AbstractStream, CPUStream, current_stream, default_stream,
                                        get_device, new_stream, record_stream, use_stream,
                                        wait_stream)

__all__ = ["Transport", "LocalTransport", "Copy", "Wait"]


class Transport(ABC):
    """Moves cell outputs of partition j to partition j+1 (and, for processes, gradients back)."""

    def begin(self, num_microbatches: int, requires_grad: bool, schedule: Schedule | None = None) -> None:
        """A new step of ``num_microbatches`` is about to run its forward, in ``schedule``'s order."""

    @abstractmethod
    def send(self, output: Tensor, microbatch: int, partition: int) -> Tensor | None:
        """Hand ``output`` of cell (microbatch, partition) to partition + 1.

        Returns:
            None, or a phony that must reach this rank's loss so that the backward fetches the
            gradient of ``output`` (the distributed transport cuts the graph here).
        """

    @abstractmethod
    def recv(self, microbatch: int, partition: int) -> Tensor:
        """The input of cell (microbatch, partition) sent by partition - 1."""

    def end_forward(self) -> None:
        """Every send of the forward is complete when this returns."""

    def end_backward(self) -> None:
        """Every gradient send of the backward is complete when this returns."""

    def deliver_sent(self) -> None:
        """After a failure on this rank: wait until what was already sent is delivered (errors
        of peers that are gone too are this rank's error's consequence, not news)."""


class Copy(torch.autograd.Function):
    """Copy a tensor to ``next_stream``'s device, on the two copy streams (gradient: back)."""

    @staticmethod
    def forward(ctx, prev_stream: AbstractStream, next_stream: AbstractStream,  # type: ignore[override]
                input: Tensor) -> Tensor:
        ctx.streams = (prev_stream, next_stream)
        return _copy(input, prev_stream, next_stream)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        prev_stream, next_stream = ctx.streams
        return None, None, _copy(grad, next_stream, prev_stream)


def _copy(x: Tensor, from_stream: AbstractStream, to_stream: AbstractStream) -> Tensor:
    consumer = current_stream(get_device(to_stream))
    # The copy is queued on to_stream, the innermost of the block (with both partitions on one
    # device, the only current one), so to_stream must wait for from_stream, which waited for
    # x's producer. Without it the copy can read x before it is written.
    wait_stream(to_stream, from_stream)
    with use_stream(from_stream), use_stream(to_stream):
        y = x.to(get_device(to_stream), copy=True)
        # x is read on the copy streams, not the stream it was allocated on; y is allocated on
        # to_stream but will be read on the consumer's (compute) stream.
        record_stream(x, from_stream)
        record_stream(x, to_stream)
        record_stream(y, consumer)
    return y


class Wait(torch.autograd.Function):
    """``next_stream`` waits for ``prev_stream`` (backward: the reverse). Values pass unchanged."""

    @staticmethod
    def forward(ctx, prev_stream: AbstractStream, next_stream: AbstractStream,  # type: ignore[override]
                input: Tensor) -> Tensor:
        ctx.streams = (prev_stream, next_stream)
        wait_stream(next_stream, prev_stream)
        return input.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        prev_stream, next_stream = ctx.streams
        wait_stream(prev_stream, next_stream)
        return None, None, grad


def _wait(x: Tensor, prev_stream: AbstractStream, next_stream: AbstractStream) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return Wait.apply(prev_stream, next_stream, x)
    wait_stream(next_stream, prev_stream)
    return x


class LocalTransport(Transport):
    """Every partition in this process; partition j lives on ``devices[j]``.

    On CPU the streams are labelled stand-ins (``compute0``, ``copy0``, ...), so a trace of the
    waits (see :func:`goose_core.engine.stream.trace_waits`) reads like the GPU's would.
    """

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = [torch.device(d) for d in devices]
        self.compute = [default_stream(d) if d.type == "cuda" else CPUStream(f"compute{j}", default_stream(d))
                        for j, d in enumerate(self.devices)]
        self.copy = [new_stream(d, f"copy{j}") for j, d in enumerate(self.devices)]
        self.mailbox: dict[tuple[int, int], Tensor] = {}

    def send(self, output: Tensor, microbatch: int, partition: int) -> None:
        j = partition
        output = _wait(output, self.compute[j], self.copy[j])
        if torch.is_grad_enabled() and output.requires_grad:
            moved = Copy.apply(self.copy[j], self.copy[j + 1], output)
        else:
            moved = _copy(output, self.copy[j], self.copy[j + 1])
        self.mailbox[(microbatch, j + 1)] = moved
        return None

    def recv(self, microbatch: int, partition: int) -> Tensor:
        x = self.mailbox.pop((microbatch, partition))
        return _wait(x, self.copy[partition], self.compute[partition])
