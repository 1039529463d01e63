"""Fixtures shared by the unit tests and the stage tests."""

from typing import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test's own tensor work on one thread: timing two threads on a busy 2-core box
    measures their barriers, not the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
