"""Streams: the CPU stand-in runs the GPU code path, and the waits come in the right order."""

import torch

from goose_core.engine.stream import (CPUStream, current_stream, default_stream, new_stream,
                                        record_stream, trace_waits, use_stream, wait_stream)
from goose_core.engine.transport import LocalTransport

CPU = torch.device("cpu")


def test_cpu_stand_in_is_a_no_op() -> None:
    stream = new_stream(CPU, "copy")
    assert isinstance(stream, CPUStream) and stream.device == CPU
    assert current_stream(CPU) is default_stream(CPU)
    x = torch.ones(2)
    wait_stream(stream, default_stream(CPU))  # x is written on the default stream
    with use_stream(stream):
        y = x * 2
    record_stream(y, stream)
    wait_stream(default_stream(CPU), stream)  # before the default stream reads y
    assert torch.equal(y, torch.full((2,), 2.0))


def test_a_boundary_waits_forward_then_mirrors_in_backward() -> None:
    transport = LocalTransport([CPU, CPU])
    x = torch.ones(3, requires_grad=True)
    with trace_waits() as waits:
        transport.send(x * 2, 0, 0)
        y = transport.recv(0, 1)
        forward = list(waits)
        (y * 3).sum().backward()
    assert forward == [("copy0", "compute0"),    # the copy waits for the compute that made x
                       ("copy1", "copy0"),       # the copy runs on copy1: it waits for copy0
                       ("compute1", "copy1")]    # the next partition waits for the copy
    assert waits[3:] == [("copy1", "compute1"),  # backward: the copy of the gradient waits
                         ("copy0", "copy1"),     # for its compute, runs on copy0,
                         ("compute0", "copy0")]  # then partition 0 waits for the copy
    assert torch.equal(x.grad, torch.full((3,), 6.0))


def test_no_grad_boundary_still_orders_streams() -> None:
    transport = LocalTransport([CPU, CPU, CPU])
    with torch.no_grad(), trace_waits() as waits:
        for j in range(2):
            transport.send(torch.ones(2), 0, j)
            transport.recv(0, j + 1)
    assert waits == [("copy0", "compute0"), ("copy1", "copy0"), ("compute1", "copy1"),
                     ("copy1", "compute1"), ("copy2", "copy1"), ("compute2", "copy2")]
