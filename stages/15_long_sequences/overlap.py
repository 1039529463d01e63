"""The ring's overlap on the CPU: one attention forward + backward at cp = 2, with the next key/value
block sent while this one is scored, and with every send waited for at once (nothing hidden).
NOTES.md's table.

    python stages/15_long_sequences/overlap.py
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from goose_core import ParallelContext, spawn
from goose_core.context_parallel import RingSpec, balanced_positions, ring, ring_attention

B, H, S, D = 1, 8, 1024, 64  # one row, 8 heads of 64, 1024 tokens: 512 a rank
REPEATS = 7


def _exposed(self: Any, t: torch.Tensor) -> None:
    """_Ring.start, waited for at once: the transfer is never hidden behind the scores."""
    _start(self, t)
    incoming = self.finish()
    self._incoming, self._works = incoming, []


_start = ring._Ring.start


def _step_seconds(ctx: ParallelContext, hidden: bool) -> float:
    torch.manual_seed(ctx.rank)
    q, k, v = (torch.randn(B, H, S // 2, D, requires_grad=True) for _ in range(3))
    spec = RingSpec(ctx.context_parallel_group, balanced_positions(S, 2))
    ring._Ring.start = _start if hidden else _exposed  # type: ignore[method-assign]
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        begin = time.perf_counter()
        ring_attention(q, k, v, spec, D ** -0.5).sum().backward()
        times.append(time.perf_counter() - begin)
    ring._Ring.start = _start  # type: ignore[method-assign]
    return statistics.median(times)


def _both(ctx_cp: int) -> tuple[float, float]:
    ctx = ParallelContext(context_parallel_size=ctx_cp, backend="gloo", device="cpu")
    torch.set_num_threads(1)
    return _step_seconds(ctx, True), _step_seconds(ctx, False)


def main() -> None:
    hidden, exposed = spawn(_both, 2, 2, timeout=600)[0]
    print("| ring step (fwd + bwd), cp = 2, rank 0 | median of 7 |")
    print("|---|---:|")
    print(f"| transfer hidden behind the scores | {hidden * 1e3:.1f} ms |")
    print(f"| transfer waited for at once | {exposed * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
