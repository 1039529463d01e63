"""The loss every data-parallel rank reports: the global mean's value, the local loss's gradient.

The all-reduce of the value is asynchronous: it runs while the backward pass computes, instead
of stopping every rank in the forward pass to wait for the slowest one (measured: ~20 % of a
DataParallel step on the shared CI machine). The loss is returned as a ``PendingMean``, a
tensor that finishes the all-reduce before anything reads it (``item()``, arithmetic,
``detach()``, printing). ``backward()`` does not read it and does not wait::

    forward   loss_r ─► value = loss_r / dp ─► async all-reduce(value) ─────────────┐
    backward  loss.backward(): local gradient, passed through                       │
    read      loss.item() ─► wait ◄───────────────────────────────────────────────────┘
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_mean", "PendingMean"]

# Calls that never read the value, so they need not wait for the all-reduce.
_NO_WAIT: set[Callable[..., Any]] = {Tensor.backward, torch.autograd.backward}


class PendingMean(Tensor):
    """A tensor whose value an async all-reduce is still writing; any read waits for it."""

    _goose_work: dist.Work | None = None

    def wait(self) -> None:
        """Block until the value is final (idempotent)."""
        work, self._goose_work = self._goose_work, None
        if work is not None:
            work.wait()

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func not in _NO_WAIT:
            for arg in (*args, *(kwargs or {}).values()):
                if isinstance(arg, PendingMean):
                    arg.wait()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))  # results are plain tensors


class _PassGradient(torch.autograd.Function):
    """Forward: ``value`` (the mean being all-reduced). Backward: the gradient goes to ``loss``.

    Passing the gradient through is right because the gradient hooks already average over the
    group: each rank differentiates its own shard's loss, and the hooks turn the shard-mean
    gradients into the global-mean gradient. All-reducing here as well would count it twice.
    """

    @staticmethod
    def forward(ctx: Any, loss: Tensor, value: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def global_mean(loss: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``loss`` averaged over ``group`` (equal shards: the global-batch mean), local gradient.

    Returns a :class:`PendingMean` whose all-reduce finishes before its value is read.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return loss
    value = loss.detach() / size  # a power-of-two dp divides exactly: same bits as sum / dp
    work = dist.all_reduce(value, group=group, async_op=True)
    out = _PassGradient.apply(loss, value).as_subclass(PendingMean)
    out._goose_work = work
    return out
