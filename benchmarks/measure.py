"""Timing and memory on one device: CUDA events (or the CPU clock), peak memory, peak matmul FLOP/s.

CUDA kernels run asynchronously: a host clock read after launching a step measures the launch,
not the work. A :class:`StepTimer` records a CUDA event on the stream at every step boundary
and synchronises once, at the end, so the timed steps run back to back as in training and each
one's device time is known. On the CPU the same calls read ``time.perf_counter``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

__all__ = ["PRECISIONS", "StepTimer", "autocast", "tf32", "reset_peak_memory", "peak_memory",
           "measure_peak_flops", "synchronize"]

#: fp32 weights with TF32 matmuls; or the same under bf16 autocast.
PRECISIONS = ("tf32", "bf16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Marks step boundaries on ``device``; :meth:`seconds` gives each step's duration."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[object] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """The time between consecutive marks (waits for the device once)."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]  # type: ignore[attr-defined]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]  # type: ignore[operator]


@contextmanager
def tf32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores (CUDA; no effect on the CPU), restored afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if device.type == "cuda" else old)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def autocast(precision: str, device: torch.device) -> ContextManager[object]:
    """The forward's context: bf16 autocast, or nothing for tf32 (the backward runs outside it,
    as torch recommends: its ops take the forward's dtypes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    """Bytes allocated at the peak since :func:`reset_peak_memory` (None on the CPU: not tracked)."""
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def measure_peak_flops(device: torch.device, precision: str, n: int, iters: int = 50, warmup: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in the precision's math (TF32 or bf16), timed on ``device``:
    the peak the MFU divides by, measured in the same run instead of read off a datasheet."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    with tf32(device):
        for _ in range(warmup):
            torch.mm(a, b)
        timer = StepTimer(device)
        synchronize(device)
        timer.mark()
        for _ in range(iters):
            torch.mm(a, b)
        timer.mark()
        (seconds,) = timer.seconds()
    return 2 * n**3 * iters / seconds
