"""Gradient buckets: parameters packed into flat buffers that one collective reduces at a time.

A bucket is a flat gradient buffer with a slot per parameter, padded so it splits into ``dp``
equal shards (the padding costs nothing for an all-reduce and is what ZeRO-1's reduce-scatter
needs)::

    bucket.grad   | p3 ......| p2 ....| p1 ...........|pad|
                  |<-- shard 0 -->|<-- shard 1 -->|<- ... (reduce-scatter: rank r keeps shard r)

Parameters go in reverse registration order, the order in which the backward pass usually
produces their gradients, so the first bucket fills (and starts communicating) first.

A buffer wider than its parameters (fp32 for bf16/fp16 parameters, the default: see
:func:`main_dtype`) is Megatron's ``main_grad``: each gradient is *added* into its slot as soon as
autograd produces it, and ``p.grad`` is freed, so a step accumulated over many micro-batches sums
in fp32 rather than rounding to bf16 after every micro-batch::

    micro-batch 1   p.grad (bf16) --+--> slot (fp32) += ..., p.grad = None
    micro-batch 2   p.grad (bf16) --+
    ...                                  the collective reduces the fp32 sums

Under ZeRO-2 (``keep_shard_only``) the flat buffer exists only while the backward fills it: the
reduce-scatter writes this rank's piece into ``shard_grad``, a buffer of its own, and once it is
done the full buffer is released (``grad`` is allocated again, zeroed, when the next backward adds
the first gradient)::

    backward     grad [ g0 | g1 | g2 | g3 ] ---reduce-scatter---> shard_grad [ g1 ]   (rank 1)
    after wait   grad released                                    shard_grad [ g1 ]   kept
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goose_core.distributed.compat import reduce_scatter_flat
from goose_core.distributed.missing import naming_missing

__all__ = ["Bucket", "build_buckets", "flat_layout", "main_dtype", "plan_buckets"]


def main_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` parameters are accumulated and reduced in by default:
    fp32 for bf16 and fp16 (8 and 11 significant bits lose a micro-batch's contribution to a
    large sum), the parameters' own dtype from fp32 up."""
    return torch.promote_types(dtype, torch.float32)


def flat_layout(params: list[nn.Parameter], pad_to: int) -> tuple[list[int], int, int, int]:
    """Where each of ``params`` starts in one flat buffer, and the buffer's sizes: (offsets,
    numel, padded_numel, shard_numel), padded so it cuts into ``pad_to`` equal shards."""
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    padded = -(-total // pad_to) * pad_to
    return offsets, total, padded, padded // pad_to


class Bucket:
    """Parameters sharing one flat gradient buffer and one collective.

    Args:
        params: the parameters, in slot order (same dtype and device).
        pad_to: the buffer's length is rounded up to a multiple of this (the dp size).
        dtype: the buffer's dtype (default: :func:`main_dtype` of the parameters').
    """

    def __init__(self, params: list[nn.Parameter], pad_to: int, dtype: torch.dtype | None = None) -> None:
        self.params = params
        self.offsets, self.numel, self.padded_numel, self.shard_numel = flat_layout(params, pad_to)
        #: The flat buffer's dtype and device.
        self.dtype = dtype or main_dtype(params[0].dtype)
        self.device = params[0].device
        self._grad: Tensor | None = None
        #: ZeRO-2: the shard has a buffer of its own and the full one is released after the
        #: reduce-scatter (see :meth:`keep_shard_only`).
        self.shard_only = False
        # A view, not a copy: the reduce-scatter writes this rank's shard in place, so the
        # gradients cost one buffer in all (launch points it at this rank's piece).
        self.shard_grad = self.grad[: self.shard_numel]
        #: Wider than the parameters: gradients are added in (main_grad), not copied.
        self.accumulates = self.grad.element_size() > params[0].element_size()
        #: Holds nothing of the current accumulation yet: zeroed before the first gradient is added.
        self.fresh = True
        self.ready: set[int] = set()
        self.work: dist.Work | None = None
        self.group: dist.ProcessGroup | None = None  # the running collective's
        #: The group it reduces over when not the reducer's: experts' expert-data-parallel group.
        self.reduce_group: dist.ProcessGroup | None = None

    @property
    def grad(self) -> Tensor:
        """The flat gradient buffer (allocated again on first use after :meth:`release`)."""
        if self._grad is None:
            self._grad = self._new_buffer()
        return self._grad

    def _new_buffer(self) -> Tensor:
        # Zeroed the first time. Again after a release only the padding is zeroed: the buffer is
        # then fresh, so the backward writes every slot before the collective reads it (a copy
        # into each slot, or the zeroing of an accumulating buffer's first sum), and a memset
        # of the whole buffer per backward would be wasted.
        if not self.shard_only:
            return torch.zeros(self.padded_numel, dtype=self.dtype, device=self.device)
        buffer = torch.empty(self.padded_numel, dtype=self.dtype, device=self.device)
        buffer[self.numel:].zero_()
        return buffer

    @property
    def allocated(self) -> bool:
        """Whether the full buffer is held now (under ZeRO-2 only while a backward fills it)."""
        return self._grad is not None

    def release(self) -> None:
        """Free the full buffer; the next use allocates one for a fresh accumulation."""
        self._grad = None
        self.fresh = True

    def keep_shard_only(self) -> None:
        """ZeRO-2: give this rank's gradient shard a buffer of its own, so the full buffer can
        be released once each reduce-scatter is done (:meth:`wait`), and release it now."""
        self.shard_only = True
        self.shard_grad = torch.zeros(self.shard_numel, dtype=self.dtype, device=self.device)
        self.release()

    def slot(self, i: int) -> Tensor:
        """The piece of the flat buffer that holds parameter ``i``'s gradient, shaped like it."""
        p = self.params[i]
        return self.grad[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)

    def flat_params(self, dtype: torch.dtype | None = None) -> Tensor:
        """The parameters' values, flattened in slot order and zero-padded like ``grad``, in
        ``dtype`` (default: the buffer's)."""
        flat = torch.zeros(self.padded_numel, dtype=dtype or self.dtype, device=self.device)
        for i, p in enumerate(self.params):
            flat[self.offsets[i] : self.offsets[i] + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The ``[start, end)`` of rank ``rank``'s shard in the flat buffer."""
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    @property
    def full(self) -> bool:
        return len(self.ready) == len(self.params)

    def sum_slot(self, i: int) -> Tensor:
        """Parameter ``i``'s slot as the running sum of this accumulation (zeroing the buffer if it
        holds none of it yet), for a gradient that arrives outside the backward's hooks."""
        if self.fresh:
            self.grad.zero_()
            self.fresh = False
        return self.slot(i)

    def add(self, i: int) -> None:
        """Add parameter ``i``'s gradient into its slot and free it (``accumulates`` buffers)."""
        param = self.params[i]
        if param.grad is None:
            return
        self.sum_slot(i).add_(param.grad)
        param.grad = None

    def mark_ready(self, i: int, divisor: int = 1) -> None:
        """Copy parameter ``i``'s gradient / ``divisor`` into its slot (zeros if it has none).

        Dividing on the way in (as torch DDP does) saves a pass over the buffer afterwards. An
        ``accumulates`` buffer adds a gradient still in ``p.grad`` to the slot's sum instead, and
        :meth:`launch` divides the whole buffer.
        """
        if self.accumulates:
            self.add(i)
            self.ready.add(i)
            return
        grad = self.params[i].grad
        if grad is None:
            self.slot(i).zero_()
        elif divisor == 1:
            self.slot(i).copy_(grad)
        else:
            torch.div(grad, divisor, out=self.slot(i))
        self.ready.add(i)

    def launch(self, group: dist.ProcessGroup, scatter: bool, divisor: int = 1) -> None:
        """Start the bucket's async all-reduce (or reduce-scatter into ``shard_grad``)."""
        for i in range(len(self.params)):
            if i not in self.ready:
                self.mark_ready(i, divisor)
        if self.accumulates:
            if self.fresh:  # no gradient at all this step: they count as zeros
                self.grad.zero_()
                self.fresh = False
            if divisor != 1:
                self.grad.div_(divisor)
        self.group = group
        if scatter:
            if not self.shard_only:
                lo, hi = self.shard_range(dist.get_rank(group))
                self.shard_grad = self.grad[lo:hi]
            self.work = reduce_scatter_flat(self.shard_grad, self.grad, group=group, async_op=True)
        else:
            self.work = dist.all_reduce(self.grad, group=group, async_op=True)

    def wait(self) -> None:
        """Block until the bucket's collective is done and forget its readiness (ZeRO-2: and
        release the full buffer, whose shard now sits in ``shard_grad``)."""
        if self.work is not None:
            with naming_missing(self.group):  # a peer that did not arrive is named
                self.work.wait()
            if self.shard_only:
                self.release()
        self.work = None
        self.ready.clear()


def plan_buckets(params: Iterable[nn.Parameter], bucket_bytes: int,
                 key: Callable[[nn.Parameter], Hashable] = lambda p: None,
                 first_bucket_bytes: int | None = None) -> list[list[nn.Parameter]]:
    """The parameters of each bucket :func:`build_buckets` makes, without allocating buffers (the
    layout the memory and traffic formulas of :mod:`goose_core.optim.zero_cost` count)."""
    groups: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    kind: Hashable = None
    for p in params:
        p_kind = (p.dtype, p.device, key(p))
        cap = bucket_bytes if groups or first_bucket_bytes is None else min(first_bucket_bytes, bucket_bytes)
        if current and (size >= cap or p_kind != kind):
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
        kind = p_kind
    if current:
        groups.append(current)
    return groups


def build_buckets(params: Iterable[nn.Parameter], bucket_bytes: int, pad_to: int,
                  key: Callable[[nn.Parameter], Hashable] = lambda p: None,
                  first_bucket_bytes: int | None = None, dtype: torch.dtype | None = None) -> list[Bucket]:
    """Pack ``params`` into buckets of about ``bucket_bytes`` each, in the order given.

    A bucket closes when it reaches ``bucket_bytes`` or when the next parameter differs from it in
    dtype, device or ``key`` (ZeRO-1 keys by param group and by how the gradient norm counts it).
    The first bucket may close earlier, at ``first_bucket_bytes`` (torch DDP uses 1 MB): the
    sooner the first collective starts, the more of the backward pass it overlaps. ``dtype`` is
    the buffers' (default: :func:`main_dtype` of each bucket's parameters).
    """
    return [Bucket(ps, pad_to, dtype) for ps in plan_buckets(params, bucket_bytes, key, first_bucket_bytes)]
