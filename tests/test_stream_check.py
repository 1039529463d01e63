"""Why streams need waits: the CPU stream checker raises where a GPU would race."""

import pytest
import torch

from goose_core.engine.stream import (current_stream, new_stream, record_stream, use_stream,
                                        wait_stream)
from goose_core.engine.stream_check import StreamRace, check_streams
from goose_core.engine.transport import AbstractStream, LocalTransport

CPU = torch.device("cpu")


def test_a_read_before_waiting_for_the_writer_raises() -> None:
    with check_streams():
        compute, copy = current_stream(CPU), new_stream(CPU, "copy")
        x = torch.ones(4) * 2  # written on compute
        with use_stream(copy), pytest.raises(StreamRace, match="missing wait_stream"):
            x + 1
        wait_stream(copy, compute)
        with use_stream(copy):
            x + 1  # now ordered after the write


def _reuse(record: bool) -> None:
    compute, copy = current_stream(CPU), new_stream(CPU, "copy")
    with use_stream(copy):
        t = torch.empty(1000).fill_(3.0)  # allocated on copy
    wait_stream(compute, copy)
    t.sum()  # read on compute
    if record:
        record_stream(t, compute)
    address = t.data_ptr()
    del t
    held = []  # keep each miss alive, so the next allocation has to take another block
    with use_stream(copy):  # copy's caching allocator would hand the block out again at once;
        for _ in range(256):  # the CPU's does too, within a few allocations
            held.append(torch.empty(1000))
            if held[-1].data_ptr() == address:
                return
    pytest.skip("the CPU allocator did not reuse the block; nothing to check")


def test_memory_reused_while_another_stream_reads_it_raises_without_record_stream() -> None:
    with check_streams(), pytest.raises(StreamRace, match="missing record_stream"):
        _reuse(record=False)
    with check_streams():
        _reuse(record=True)


def _old_copy(x: torch.Tensor, from_stream: AbstractStream, to_stream: AbstractStream) -> torch.Tensor:
    """The copy as it was: to_stream never waited for from_stream."""
    with use_stream(from_stream), use_stream(to_stream):
        return x.to(CPU, copy=True)


def test_the_old_one_device_copy_races_and_the_current_one_does_not(monkeypatch) -> None:
    import goose_core.engine.transport as transport_module

    for copy, expected in [(_old_copy, pytest.raises(StreamRace, match="'copy1' reads memory")),
                           (transport_module._copy, None)]:
        monkeypatch.setattr(transport_module, "_copy", copy)
        with check_streams():
            transport = LocalTransport([CPU, CPU])  # both partitions on one device
            x = torch.ones(3, requires_grad=True)
            if expected is None:
                transport.send(x * 2, 0, 0)
                (transport.recv(0, 1) * 3).sum().backward()
                assert torch.equal(x.grad, torch.full((3,), 6.0))
            else:
                with expected:
                    transport.send(x * 2, 0, 0)
