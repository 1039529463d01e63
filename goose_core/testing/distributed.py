"""Run a test body on every rank of a (tp, pp, dp) layout, each rank holding its ParallelContext."""

from __future__ import annotations

from typing import Any, Callable

from goose_core.distributed import ParallelContext, layouts, spawn

__all__ = ["run_distributed", "layouts"]


def _with_context(fn: Callable[..., Any], tp: int, pp: int, dp: int, args: tuple, kwargs: dict,
                  ep: int = 1) -> Any:
    # gloo on the CPU, explicitly: the ranks are forked, and a forked child must not touch CUDA
    # even on a machine that has it (the parent may have initialised it).
    ctx = ParallelContext(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                          expert_parallel_size=ep, backend="gloo", device="cpu")
    return fn(ctx, *args, **kwargs)


def run_distributed(fn: Callable[..., Any], tp: int = 1, pp: int = 1, dp: int = 1, *args: Any,
                    timeout: float = 180.0, ep: int = 1, **kwargs: Any) -> list[Any]:
    """Fork tp*pp*dp ranks, build the ParallelContext on each (``ep``: its expert_parallel_size),
    return ``fn(ctx, *args, **kwargs)`` from every rank in rank order. ``fn`` must be a
    module-level function (results are pickled)."""
    return spawn(_with_context, tp * pp * dp, fn, tp, pp, dp, args, kwargs, ep, timeout=timeout)
