"""Copy and Wait on real CUDA streams, in the style of torchgpipe's race tests.

A producer stream sleeps (``torch.cuda._sleep``) before it writes; the consumer, on another
stream, must still read the written values, because goose's ``Copy``, ``Wait`` and
``LocalTransport`` queued the waits. A missing ``wait_stream`` lets the consumer run ahead and
read zeros or stale memory. Then the allocator side: a block freed on its own stream while a
copy stream, still sleeping, has yet to read it must not be handed out again (``record_stream``);
without it a new tensor takes the block and is written before the late copy reads it. The CUDA
sanitizer (``test_sanitizer.py``) sees the first kind of race but not the second: it forgets a
block's readers when the block is freed.

Each test runs with both partitions on one GPU (the copy streams of one device) and, given two
GPUs, on two.
"""

from __future__ import annotations

import itertools
from typing import Callable

import pytest
import torch
from torch import Tensor

from goose_core.engine.stream import new_stream, use_stream
from goose_core.engine.transport import Copy, LocalTransport, Wait

pytestmark = pytest.mark.gpu

#: The producer's head start: ages next to the microseconds the CPU takes to queue what follows.
SLEEP_S = 0.05
N = 1 << 20  # 8 MiB of float64: a copy long enough to overlap a late write


@pytest.fixture(params=["one-device", "two-devices"])
def devices(request: pytest.FixtureRequest) -> tuple[torch.device, torch.device]:
    if request.param == "two-devices":
        if torch.cuda.device_count() < 2:
            pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", 0), torch.device("cuda", 1)
    return torch.device("cuda", 0), torch.device("cuda", 0)


class SleepInBackward(torch.autograd.Function):
    """Identity whose backward sleeps on its stream, then writes the gradient: a late producer
    for whatever carries the gradient on."""

    @staticmethod
    def forward(ctx, x: Tensor, sleep: Callable[[float], None]) -> Tensor:  # type: ignore[override]
        ctx.sleep = sleep
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        ctx.sleep(SLEEP_S)
        return grad * 1.0, None


def _full(value: float, device: torch.device) -> Tensor:
    return torch.full((N,), value, dtype=torch.float64, device=device)


_values = itertools.count(101)


def _fresh() -> float:
    """A value no earlier tensor of this process held: a reader that runs ahead and finds a
    recycled block cannot pass by finding an older test's numbers in it."""
    return float(next(_values))


def test_copy_and_wait_read_a_late_producer(devices: tuple[torch.device, torch.device],
                                            cuda_sleep: Callable[[float], None]) -> None:
    # torchgpipe's test_copy_wait_cuda_cuda on goose's Copy and Wait, forward only: the backward
    # needs the Wait on the producer's side too, as the transport places it (the next test).
    value = _fresh()
    prev_stream, next_stream = new_stream(devices[0]), new_stream(devices[1])
    with use_stream(prev_stream):
        cuda_sleep(SLEEP_S)
        x = _full(value, devices[0])  # written late
    with use_stream(next_stream):  # the consumer: it reads y once Wait made it wait
        y = Wait.apply(prev_stream, next_stream, Copy.apply(prev_stream, next_stream, x))
        assert torch.equal(y, _full(value, devices[1]))


def test_the_transport_hands_over_a_late_cell_output_and_its_gradient(
        devices: tuple[torch.device, torch.device], cuda_sleep: Callable[[float], None]) -> None:
    value, scale = _fresh(), _fresh()
    transport = LocalTransport(list(devices))
    leaf = torch.zeros(N, dtype=torch.float64, device=devices[0], requires_grad=True)
    with use_stream(transport.compute[0]):
        cuda_sleep(SLEEP_S)
        output = leaf + value  # cell (0, 0)'s output, written late on partition 0's compute stream
    transport.send(output, 0, 0)
    del output
    x = transport.recv(0, 1)
    with use_stream(transport.compute[1]):
        x = SleepInBackward.apply(x, cuda_sleep)
        assert torch.equal(x, _full(value, devices[1]))
        (scale * x).sum().backward()  # the gradient, written late, goes back through the copy streams
    torch.cuda.synchronize()
    assert torch.equal(leaf.grad, _full(scale, devices[0]))


def test_a_block_the_copy_still_reads_is_not_handed_out_again(
        devices: tuple[torch.device, torch.device], cuda_sleep: Callable[[float], None]) -> None:
    value = _fresh()
    transport = LocalTransport(list(devices))
    with use_stream(transport.copy[1]):
        cuda_sleep(SLEEP_S)  # the next partition's copy stream is busy: the copy runs late
    with use_stream(transport.compute[0]):
        output = _full(value, devices[0])
        block = output.data_ptr()
        transport.send(output, 0, 0)
        del output  # freed on the compute stream, still to be read by the copy
        other = _full(_fresh(), devices[0])  # same size, same stream: the block it would reuse
    assert other.data_ptr() != block, "the allocator handed out a block a copy stream still reads"
    x = transport.recv(0, 1)
    with use_stream(transport.compute[1]):
        assert torch.equal(x, _full(value, devices[1]))


def test_a_received_block_the_consumer_still_reads_is_not_handed_out_again(
        devices: tuple[torch.device, torch.device], cuda_sleep: Callable[[float], None]) -> None:
    value = _fresh()
    transport = LocalTransport(list(devices))
    transport.send(_full(value, devices[0]), 0, 0)
    x = transport.recv(0, 1)  # allocated on the copy stream, read on the compute stream
    with use_stream(transport.compute[1]):
        cuda_sleep(SLEEP_S)
        doubled = 2 * x  # reads x late
    block = x.data_ptr()
    del x
    with use_stream(transport.copy[1]):
        other = _full(_fresh(), devices[1])  # the copy stream's next allocation: x's block, unless recorded
    assert other.data_ptr() != block, "the allocator handed out a block the compute stream still reads"
    with use_stream(transport.compute[1]):
        assert torch.equal(doubled, _full(2 * value, devices[1]))


@pytest.mark.usefixtures("issue_10_copy")
def test_issue_10_copy_reads_a_late_output_too_early(cuda_sleep: Callable[[float], None], sanitized: bool) -> None:
    # These tests have teeth: with the copy of issue 10, both partitions on one GPU, the next
    # partition reads the output before the sleeping producer wrote it. Under the sanitizer the
    # copy's launch is the race it reports (test_sanitizer.py checks that it does).
    device = torch.device("cuda", 0)
    value = _fresh()
    transport = LocalTransport([device, device])
    with use_stream(transport.compute[0]):
        cuda_sleep(SLEEP_S)
        output = _full(value, device)
    if sanitized:
        from torch.cuda._sanitizer import CUDASanitizerErrors

        with pytest.raises(CUDASanitizerErrors):
            transport.send(output, 0, 0)
        return
    transport.send(output, 0, 0)
    x = transport.recv(0, 1)
    with use_stream(transport.compute[1]):
        assert not torch.equal(x, _full(value, device)), "the racing copy read the finished output"
