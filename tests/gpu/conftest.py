"""The GPU tests' gate and fixtures: every test marked ``gpu`` skips, for one stated reason, without CUDA.

``make test`` collects these files on any machine (they import nothing that needs a GPU) and skips
them before any fixture or body runs, so on CPU they cost only their collection. ``make test-gpu``
runs them (``pytest -m gpu tests/gpu``) on a machine with a CUDA build of torch and a GPU.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from torch import Tensor

from goose_core.engine.stream import AbstractStream, current_stream, get_device, record_stream, use_stream

#: Set by the sanitizer test in its child pytest: tiny models, two steps (the sanitizer runs a
#: Python check on every kernel launch, so only the race logic matters there, not the size).
TINY_ENV = "GOOSE_GPU_TINY"


def no_cuda_reason() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if torch.version.cuda is None:
        return (f"needs a CUDA GPU: this torch ({torch.__version__}) is a CPU-only build; "
                f"run `make test-gpu` on a GPU machine with a CUDA build of torch")
    if not torch.cuda.is_available():
        return f"needs a CUDA GPU: torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = no_cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny() -> bool:
    """Whether this run is the sanitizer's (small models, few steps)."""
    return os.environ.get(TINY_ENV) == "1"


def cycles_per_second() -> float:
    """GPU clock cycles a second, as ``torch.cuda._sleep`` counts them, at the boosted clock.

    The SM clock idles low and boosts under load (an H200: 345 MHz idle, 1980 MHz busy). Timed
    on an idle GPU, a sleep counts idle cycles, and every later sleep at the boost clock lasts
    about 6x less than asked: short enough for the GPU to catch up with the host, which hid
    issue 10's race from ``test_issue_10_race_fails_the_comparison`` on the first H200 run. So
    the clock is warmed up first and the fastest of several timings is kept: a sleep then lasts
    at least what it asks for at any clock.
    """
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(50):
        a = a @ a / 64.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(5):
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        rates.append(10_000_000 / (start.elapsed_time(end) / 1e3))
    return max(rates)


@pytest.fixture(scope="session")
def cuda_sleep() -> Callable[[float], None]:
    """``cuda_sleep(seconds)`` queues a kernel that spins for at least that long on the current stream.

    torchgpipe's fixture: ``torch.cuda._sleep`` takes GPU clock cycles, calibrated once by
    :func:`cycles_per_second`. A stream that must wait for the sleeping one then runs late;
    a stream that forgot to wait runs ahead and reads what is not written yet.
    """
    rate = cycles_per_second()

    def sleep(seconds: float) -> None:
        torch.cuda._sleep(int(seconds * rate))
    return sleep


def _issue_10_copy(x: Tensor, from_stream: AbstractStream, to_stream: AbstractStream) -> Tensor:
    """``transport._copy`` as it was before issue 10's fix: with both partitions on one device
    the copy runs on ``to_stream``, which never waited for ``from_stream`` (nor so for the
    producer): it reads the cell's output whenever it gets to run."""
    consumer = current_stream(get_device(to_stream))
    with use_stream(from_stream), use_stream(to_stream):
        y = x.to(get_device(to_stream), copy=True)
        record_stream(x, from_stream)
        record_stream(y, consumer)
    return y


@pytest.fixture
def issue_10_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local transport copies as it did before issue 10's fix: the tests that use this show
    that the race tests, the parity test and the sanitizer all catch it on a GPU."""
    import goose_core.engine.transport as transport

    monkeypatch.setattr(transport, "_copy", _issue_10_copy)


@pytest.fixture
def sanitized() -> bool:
    """Whether this process runs under the CUDA sanitizer (TORCH_CUDA_SANITIZER, read at torch's import)."""
    return "TORCH_CUDA_SANITIZER" in os.environ
