"""The loss every data-parallel rank reports, and the token count that makes it the global mean.

**The token-weighted mean.** One device divides the summed token losses of the whole batch by
its number of targets N. The mean of per-rank means is something else whenever ranks hold
different numbers of targets (padding, ``-100`` labels): a rank with 2 targets would weigh as
much as one with 200, and a rank with none would give 0/0 = NaN. So DataParallel counts the
targets of every rank (one all-reduce of one integer, before the forward pass) and hands the
model ``num_items_in_batch = N / dp`` (🤗's convention: the model returns its token-loss sum
divided by it). The gradient hooks average over dp, which divides by dp once more::

    dp rank       0: [a b c d]          1: [e f _ _]           _ = -100
    count         4                     2          ─► all-reduce: N = 6
    model loss    s0 / (N/dp)           s1 / (N/dp)            s_r: rank r's token-loss sum
    gradients     averaged over dp:     (s0 + s1)' / N         = the one-device gradient
    .loss         dp mean:              (s0 + s1) / N          = the one-device loss

A rank with no target returns exactly 0 and adds nothing. With gradient accumulation the caller
passes ``num_items_in_batch`` itself: the number of targets of the whole optimizer step, over
every micro-step and every dp rank (what one device would divide by; see
:func:`count_items_over`); each micro-step's ``.loss`` is then its share of the step's mean, and
the shares add up to it. N/dp is a Python float, exact for a power-of-two dp: a tensor would
promote an fp32 loss to its own dtype. The count is waited for before the forward pass: the
model needs it, and it is one integer.

**The reported value.** Its all-reduce is asynchronous: it runs while the backward pass
computes, instead of stopping every rank in the forward pass to wait for the slowest one
(measured: ~20 % of a DataParallel step on the shared CI machine). The loss is returned as a
``PendingMean``, a tensor that finishes the all-reduce before anything reads it (``item()``,
arithmetic, ``detach()``, printing). ``backward()`` does not read it and does not wait::

    forward   loss_r ─► value = loss_r / dp ─► async all-reduce(value) ─────────────┐
    backward  loss.backward(): local gradient, passed through                       │
    read      loss.item() ─► wait ◄───────────────────────────────────────────────────┘
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.missing import naming_missing
from goose_core.loss import count_items, nonzero

__all__ = ["global_mean", "PendingMean", "count_items_over", "replica_items"]

# Calls that never read the value, so they need not wait for the all-reduce.
_NO_WAIT: set[Callable[..., Any]] = {Tensor.backward, torch.autograd.backward}


class PendingMean(Tensor):
    """A tensor whose value an async all-reduce is still writing; any read waits for it."""

    _pending_work: dist.Work | None = None
    _pending_group: dist.ProcessGroup | None = None

    def wait(self) -> None:
        """Block until the value is final (idempotent)."""
        work, self._pending_work = self._pending_work, None
        if work is not None:
            with naming_missing(self._pending_group):
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
    out._pending_work, out._pending_group = work, group
    return out


def count_items_over(labels: Tensor, group: dist.ProcessGroup, device: torch.device | None = None,
                     shifted: bool = False) -> Tensor:
    """The targets of ``labels`` (unshifted, as passed to the model; ``shifted``: already each
    position's target, as a context-parallel slice's) summed over ``group``.

    A collective: every rank of ``group`` calls it. Gradient accumulation passes the sum of this
    over its micro-steps as ``num_items_in_batch``. ``device``: where the collective needs the
    count (the process group's device; default: the labels').
    """
    n = count_items(labels, shifted=shifted)
    if device is not None:
        n = n.to(device)
    if dist.get_world_size(group) > 1:
        with naming_missing(group):
            dist.all_reduce(n, group=group)
    return n


def replica_items(num_items_in_batch: Tensor | float, dp: int) -> float:
    """What each of ``dp`` replicas hands its model: ``N / dp`` (N = 0, no target, counts as 1).

    The model divides its token-loss sum by it, and averaging the gradients over dp divides by
    dp again: the replicas' gradients add up to the sum over all N targets, divided by N.
    """
    n = float(num_items_in_batch) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return float(nonzero(n)) / dp
