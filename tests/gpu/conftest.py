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


@pytest.fixture(scope="session")
def cuda_sleep() -> Callable[[float], None]:
    """``cuda_sleep(seconds)`` queues a kernel that spins for that long on the current stream.

    torchgpipe's fixture: ``torch.cuda._sleep`` takes GPU clock cycles, so one timed call
    calibrates cycles per second. A stream that must wait for the sleeping one then runs late;
    a stream that forgot to wait runs ahead and reads what is not written yet.
    """
    torch.empty(1, device="cuda")  # initialise CUDA before timing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 1_000_000 / (start.elapsed_time(end) / 1e3)

    def sleep(seconds: float) -> None:
        torch.cuda._sleep(int(seconds * cycles_per_s))
    return sleep
