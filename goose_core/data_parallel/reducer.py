"""The gradient reducer: per-parameter hooks that reduce buckets while the backward pass runs.

Timeline of one backward pass with three buckets (b0 holds the last layers, whose gradients
come first)::

    backward   | grads of b0 | grads of b1 | grads of b2 |  end of backward (engine callback)
    comm                     | reduce b0 ->| reduce b1 ->| reduce b2 -> wait all
                             ^ b0 full: its async collective starts while b1's grads compute

Each parameter's ``post_accumulate_grad`` hook copies its gradient into its bucket's slot; a
full bucket starts its async collective, always in bucket order so every rank issues the same
collectives in the same order (a bucket that fills early waits for the ones before it). The
first hook of a backward queues a callback on the autograd engine that runs when that backward
ends: it launches buckets not yet full (a parameter without a gradient counts as zeros) and
waits for all of them. Averaging costs no extra pass: all-reduce inputs are divided by dp as
they are copied in (as DDP does); reduce-scatter shards are divided once they arrive. Hooks,
not a wrapper around ``loss.backward()``, so anything that drives autograd (the pipeline
engine's backward across ranks) triggers them.

Two modes: all-reduce (plain data parallelism; ``p.grad`` becomes its slot of the averaged
buffer) and reduce-scatter (ZeRO-1; each rank keeps only its shard of the averaged buffer,
``bucket.shard_grad``, and ``p.grad`` is freed). Buffers wider than their parameters (fp32 for a bf16
model, the default) add every gradient in as autograd produces it, under ``no_sync`` and inside a
pipeline's deferred backward too, so micro-batches and accumulation steps sum in fp32
(Megatron's ``main_grad``, see :mod:`.bucket`); :meth:`GradReducer.main_grad` hands the reduced
fp32 gradient to master weights. The pipeline and ZeRO-1 drive it through
:class:`goose_core.grad_sync.GradSync`, the interface it implements.

ZeRO-2 (``zero_stage=2``) is reduce-scatter mode with each bucket's full buffer released as soon
as its reduce-scatter is done (:meth:`~.bucket.Bucket.keep_shard_only`): launching bucket k waits
for bucket k-2, so at most two reduce-scatters are in flight and the full buffers of the buckets
before them are already gone while the backward still runs::

    backward   | grads b0 | grads b1 | grads b2 | grads b3 |
    comm                  | RS b0 -->| RS b1 -->| RS b2 -->| RS b3 --> wait all
    held full             b0         b0 b1      b1 b2      b2 b3 (b0 released at b2's launch)
    held shard            every bucket's 1/dp piece, between steps too

Gradient accumulation, two ways (the caller picks, the trade-off is measured in the chapter):

* ``no_sync`` for all micro-batches but the last: nothing is sent until the last backward, so
  the full gradients (``p.grad``, or the full fp32 buffers of a bf16 model) are held meanwhile:
  ZeRO-1's memory during accumulation, ZeRO-1's traffic.
* every backward synced: each micro-batch reduce-scatters and adds into the kept shard, so full
  buffers never outlive their backward: ZeRO-2's memory, and the gradient traffic times the
  number of micro-batches.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from goose_core.data_parallel.bucket import Bucket, build_buckets
from goose_core.distributed.progress import note
from goose_core.grad_sync import GradSync
from goose_core.metadata import (clear_wide_grad, expert_group_of, link_grad_sync, set_wide_grad,
                                 unlink_grad_sync)

__all__ = ["GradReducer", "FIRST_BUCKET_BYTES", "IN_FLIGHT", "trainable"]

#: The first bucket closes early so that communication starts early in the backward (as DDP).
FIRST_BUCKET_BYTES = 2**20
#: ZeRO-2: reduce-scatters in flight before the oldest is waited for and its full buffer released.
IN_FLIGHT = 2


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that need gradients, in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


class GradReducer(GradSync):
    """Averages the gradients of ``params`` over ``group`` as the backward pass produces them.

    Args:
        params: the parameters that need gradients (in registration order).
        group: the data-parallel process group.
        bucket_bytes: the size at which a bucket closes.
        reduce_dtype: the buckets' dtype (default: :func:`~.bucket.main_dtype`, fp32 for bf16 and
            fp16 parameters, else their own); gradients are cast into it, summed over the group,
            and cast back into ``p.grad``. ``torch.bfloat16`` for a bf16 model halves the bytes
            moved and accumulates and sums in bf16.
        zero_stage: 2 releases each bucket's full buffer after its reduce-scatter once ZeRO
            takes the reducer over (:meth:`shard`); 1 keeps it (ZeRO-1, and plain DP).
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, bucket_bytes: int,
                 reduce_dtype: torch.dtype | None = None, zero_stage: int = 1) -> None:
        self.group = group
        self.zero_stage = zero_stage
        self.size = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        self.reduce_dtype = reduce_dtype
        self.sync = True
        self.deferred = False
        self._reduced = False  # a backward reduced every bucket; ZeRO-1 resets it after its step
        self.scatter = False
        self.buckets: list[Bucket] = []
        self._where: dict[nn.Parameter, tuple[Bucket, int]] = {}
        self._handles: list[RemovableHandle] = []
        self._next = 0
        self._callback_queued = False
        self._carry: list[Tensor] | None = None
        self._rebuild([params], scatter=False)

    # -- GradSync ----------------------------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        """Every parameter whose gradient this reducer averages."""
        return list(self._where)

    @property
    def reduced(self) -> bool:
        return self._reduced

    def reset(self) -> None:
        self._reduced = False
        self._carry = None
        for bucket in self.buckets:
            bucket.fresh = True  # the optimizer consumed the sums (ZeRO-1 gathered params into them)

    def track(self, model: nn.Module) -> None:
        if self.scatter:
            raise ValueError("the model's parameters changed after DistributedOptimizer took over its "
                             "DataParallel reducer: apply every wrapper (TensorParallel, "
                             "PipelineParallel, DataParallel) first, then build the optimizer from "
                             "model.parameters()")
        self._rebuild([trainable(model)], scatter=False)

    def shard(self, param_lists: list[list[nn.Parameter]],
              key: Callable[[nn.Parameter], Hashable]) -> list[Bucket]:
        self._rebuild(param_lists, scatter=True, key=key)
        if self.zero_stage == 2:
            for bucket in self.buckets:
                bucket.keep_shard_only()
        return self.buckets

    def _rebuild(self, param_lists: list[list[nn.Parameter]], scatter: bool,
                 key: Callable[[nn.Parameter], Hashable] = lambda p: None) -> None:
        """Re-bucket: one run of buckets per list, new hooks; parameters left out are released.

        Raises:
            RuntimeError: a backward pass is in flight (its buckets are half filled).
        """
        if self._callback_queued or self.deferred or self._next:
            raise RuntimeError("cannot re-bucket the gradient reducer while a backward pass is in flight")
        for handle in self._handles:
            handle.remove()
        before = list(self._where)
        self.scatter = scatter
        # An expert's gradient is summed over the ranks holding the same experts only: buckets
        # of their own, padded to and reduced (or sharded, ZeRO) over that group, still divided
        # by the dp size (see goose_core/expert_parallel/parallel.py).
        self.buckets = []
        for params in param_lists:
            for group, ps in _by_group(params):
                size = self.size if group is None else dist.get_world_size(group)
                built = build_buckets(reversed(ps), self.bucket_bytes, size, key, FIRST_BUCKET_BYTES,
                                      dtype=self.reduce_dtype)
                for bucket in built:
                    bucket.reduce_group = group
                self.buckets += built
        self._where = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._where]
        for p, (bucket, i) in self._where.items():
            link_grad_sync(p, self)
            if bucket.accumulates:  # summed in fp32 as the backward runs: a late addition goes there too
                set_wide_grad(p, bucket.dtype, lambda bucket=bucket, i=i: bucket.sum_slot(i))
            else:
                clear_wide_grad(p)
        for p in before:
            if p not in self._where:
                unlink_grad_sync(p, self)  # replaced or dropped: no longer this reducer's
                clear_wide_grad(p)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip communication inside: gradients accumulate locally in ``p.grad``."""
        before, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = before

    def defer(self) -> None:
        """Hold every hook until :meth:`flush`: for a driver whose backward accumulates a
        parameter's gradient several times (the pipeline's recomputes run nested backward
        passes, one per micro-batch, so a hook would fire before the gradient is complete)."""
        self.deferred = True

    def flush(self) -> None:
        """Reduce every gradient the deferred backward produced, and wait for it."""
        self.deferred = False
        if not self.sync:
            return
        self._refuse_unsharded()
        self._keep_reduced()
        for param in self._where:
            if param.grad is not None:
                self._ready(param)
        self.finish()

    def main_grad(self, param: nn.Parameter) -> Tensor | None:
        """``param``'s averaged gradient in its bucket's wider dtype (fp32 for a bf16 parameter),
        valid from the end of a synced backward until the next backward starts; ``None`` when
        its bucket is not wider than the parameter (all-reduce mode only: ZeRO-1 reads shards)."""
        bucket, i = self._where[param]
        return bucket.slot(i) if bucket.accumulates and not self.scatter else None

    def _keep_reduced(self) -> None:
        """A backward after a reduce-scatter whose shards the optimizer has not consumed yet
        (accumulation without ``no_sync``): carry each reduced shard aside before anything
        writes the buffers, and start every buffer afresh; the next reduce-scatter's shard is
        added to the carried one. (Summing on in the old buffer would reduce its other ranks'
        pieces, local sums, a second time.)"""
        if self.scatter and self._reduced and self._carry is None:
            self._carry = [b.shard_grad.clone() for b in self.buckets]
            for bucket in self.buckets:
                bucket.fresh = True

    def _refuse_unsharded(self) -> None:
        """ZeRO-2 without a DistributedOptimizer would reduce full gradients nobody shards:
        refused at the first synced backward, before its first collective (every rank alike)."""
        if self.zero_stage == 2 and not self.scatter:
            raise ValueError("DataParallel(zero_stage=2) shards gradients for a DistributedOptimizer: wrap "
                             "the optimizer in DistributedOptimizer(optimizer, ctx) before the first "
                             "backward, or use zero_stage=1 for plain data parallelism")

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket, i = self._where[param]
        self._keep_reduced()
        if bucket.accumulates:
            bucket.add(i)  # main_grad: summed in the wide dtype whether or not this backward syncs
        if not self.sync or self.deferred:
            return
        if not self._callback_queued:
            self._refuse_unsharded()
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self._ready(param)

    def _ready(self, param: nn.Parameter) -> None:
        bucket, i = self._where[param]
        bucket.mark_ready(i, divisor=1 if self.scatter else self.size)  # all-reduce: pre-divided
        if self.scatter:
            param.grad = None  # its value lives in the bucket now; ZeRO-1 keeps only the shard
        while self._next < len(self.buckets) and self.buckets[self._next].full:
            self._launch(self.buckets[self._next])

    def _launch(self, bucket: Bucket) -> None:
        bucket.launch(bucket.reduce_group or self.group, self.scatter,
                      divisor=1 if self.scatter else self.size)
        if bucket.shard_only and self._next >= IN_FLIGHT:
            self.buckets[self._next - IN_FLIGHT].wait()  # done: its full buffer is released
        self._next += 1

    def finish(self) -> None:
        """Reduce what is left and wait for every bucket (the end of a backward pass)."""
        note("data-parallel gradient reduction")
        self._callback_queued = False
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        self._next = 0
        carry = self._carry or [None] * len(self.buckets)
        self._carry = None
        for bucket, earlier in zip(self.buckets, carry):
            bucket.wait()
            if self.scatter:
                bucket.shard_grad.div_(self.size)
                if earlier is not None:
                    bucket.shard_grad.add_(earlier)
                continue
            for i, p in enumerate(bucket.params):
                p.grad = bucket.slot(i).to(p.dtype)  # the slot itself unless reduce_dtype differs
            # p.grad carries the sum on if another backward comes before zero_grad (as autograd
            # does without DataParallel); the slot keeps main_grad() until that backward starts.
            bucket.fresh = True
        self._reduced = True


def _by_group(params: list[nn.Parameter]) -> list[tuple[dist.ProcessGroup | None, list[nn.Parameter]]]:
    """``params`` split by the group their gradient is reduced over: the dense ones (None: the
    reducer's) first, then each expert group's, each in the order given."""
    groups: dict[int, tuple[dist.ProcessGroup | None, list[nn.Parameter]]] = {id(None): (None, [])}
    for p in params:
        group = expert_group_of(p)
        groups.setdefault(id(group), (group, []))[1].append(p)
    return [(g, ps) for g, ps in groups.values() if ps]
