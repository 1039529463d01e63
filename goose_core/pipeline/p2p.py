"""The distributed transport: one partition per rank, activations and gradients by isend/irecv.

The autograd graph is cut at every rank boundary and stitched back by two functions::

    rank j                                        rank j+1
    y ──Send──► phony (kept by the loss)          Recv ──► x ──► cell ...
        forward:  isend y ═══════════════════════► irecv x (posted one micro-batch ahead)
                  irecv grad y (posted now)
        backward: wait grad y ◄═══════════════════ isend grad x

Every receive is posted before it is needed: while micro-batch i computes, i's send and i+1's
receive are in flight, and in the backward the gradient of a cell is already on its way while its
recompute runs. Shapes and dtype are exchanged once per step (micro-batches are equal-sized).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.pipeline.dependency import get_phony
from goose_core.pipeline.transport import Transport

__all__ = ["DistributedTransport"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEADER = 10  # [dtype code, ndim, up to 8 sizes]


def _header(t: Tensor) -> Tensor:
    sizes = list(t.shape) + [0] * (_HEADER - 2 - t.dim())
    # On the tensor's device: NCCL moves only GPU tensors.
    return torch.tensor([_DTYPES.index(t.dtype), t.dim(), *sizes], dtype=torch.int64, device=t.device)


class DistributedTransport(Transport):
    """The boundary between this rank's partition and its pipeline neighbours.

    Args:
        group: the pipeline-parallel process group.
        prev_rank, next_rank: global ranks of the neighbouring stages (None at the ends).
        device: where received tensors are allocated.
    """

    def __init__(self, group: Any, prev_rank: int | None, next_rank: int | None,
                 device: torch.device) -> None:
        self.group, self.prev_rank, self.next_rank, self.device = group, prev_rank, next_rank, device
        self.begin(1, False)

    # -- tags: per step, the header, then one per micro-batch for activations and gradients ----
    # A step whose loss never went backward leaves gradient receives posted; tags that change
    # every step keep them from swallowing a later step's messages.
    def _header_tag(self) -> int:
        return self.step * (2 * self.num_microbatches + 1)

    def _act_tag(self, i: int) -> int:
        return self._header_tag() + 1 + i

    def _grad_tag(self, i: int) -> int:
        return self._header_tag() + 1 + self.num_microbatches + i

    def begin(self, num_microbatches: int, requires_grad: bool) -> None:
        self.step = getattr(self, "step", -1) + 1
        self.num_microbatches = num_microbatches
        self.requires_grad = requires_grad
        self.sends: list[tuple[Any, Tensor]] = []  # (work, tensor kept alive until sent)
        self.recvs: dict[int, tuple[Any, Tensor]] = {}
        self.like: Tensor | None = None  # shape/dtype template of received activations

    # -- forward ---------------------------------------------------------------------------
    def _isend(self, t: Tensor, dst: int, tag: int) -> None:
        t = t.detach().contiguous()
        self.sends.append((dist.isend(t, dst, group=self.group, tag=tag), t))

    def _irecv(self, like: Tensor, src: int, tag: int) -> tuple[Any, Tensor]:
        buf = torch.empty_like(like, device=self.device)
        return dist.irecv(buf, src, group=self.group, tag=tag), buf

    def send(self, output: Tensor, microbatch: int, partition: int) -> Tensor | None:
        assert self.next_rank is not None
        if microbatch == 0:
            self._isend(_header(output), self.next_rank, tag=self._header_tag())
        if not (self.requires_grad and output.requires_grad):
            self._isend(output, self.next_rank, self._act_tag(microbatch))
            return None
        return Send.apply(output, self, microbatch)

    def _post_recv(self, i: int) -> None:
        if i < self.num_microbatches and i not in self.recvs:
            assert self.like is not None and self.prev_rank is not None
            self.recvs[i] = self._irecv(self.like, self.prev_rank, self._act_tag(i))

    def recv(self, microbatch: int, partition: int) -> Tensor:
        if self.like is None:
            self.like = self._recv_header()
        self._post_recv(microbatch)
        work, x = self.recvs.pop(microbatch)
        self._post_recv(microbatch + 1)  # in flight while this micro-batch computes
        work.wait()
        if not self.requires_grad:
            return x
        return Recv.apply(get_phony(self.device, requires_grad=True), x, self, microbatch)

    def _recv_header(self) -> Tensor:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, self.prev_rank, group=self.group, tag=self._header_tag())
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        return torch.empty([int(s) for s in header[2:2 + ndim]], dtype=dtype, device="meta")

    def end_forward(self) -> None:
        self._drain()

    def end_backward(self) -> None:
        self._drain()

    def _drain(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


class Send(torch.autograd.Function):
    """Forward: isend the activation, post the receive of its gradient. Backward: wait for it."""

    @staticmethod
    def forward(ctx, output: Tensor, transport: DistributedTransport,  # type: ignore[override]
                microbatch: int) -> Tensor:
        transport._isend(output, transport.next_rank, transport._act_tag(microbatch))
        ctx.grad = transport._irecv(output, transport.next_rank, transport._grad_tag(microbatch))
        return get_phony(output.device, requires_grad=False).detach()

    @staticmethod
    def backward(ctx, grad_phony: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        work, grad = ctx.grad
        work.wait()
        del ctx.grad
        return grad, None, None


class Recv(torch.autograd.Function):
    """Forward: the received activation, as a tensor of the graph. Backward: isend its gradient."""

    @staticmethod
    def forward(ctx, phony: Tensor, received: Tensor,  # type: ignore[override]
                transport: DistributedTransport, microbatch: int) -> Tensor:
        ctx.transport, ctx.tag = transport, transport._grad_tag(microbatch)
        return received.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        transport: DistributedTransport = ctx.transport
        transport._isend(grad, transport.prev_rank, ctx.tag)
        return None, None, None, None
