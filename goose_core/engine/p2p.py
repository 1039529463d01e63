"""The distributed transport: one partition per rank, activations and gradients by isend/irecv.

The autograd graph is cut at every rank boundary and stitched back by two functions::

    rank j                                        rank j+1
    y ──Send──► phony (kept by the loss)          Recv ──► x ──► cell ...
        forward:  isend y ═══════════════════════► irecv x (posted one micro-batch ahead)
        backward: irecv grad y ◄══════════════════ isend grad x

No message carries a meaningful tag (NCCL ignores tags): each boundary is a :class:`_Channel`
that issues the messages :func:`~goose_core.engine.messages.messages` derives from the
schedule, strictly in that order, on both sides. A send that autograd hands over before its
turn is held until the messages before it are out; a receive is posted when it (or a later
message of its channel) is needed, plus one ahead so it is in flight while the current
micro-batch computes. Shapes and dtype are exchanged once per step (micro-batches are
equal-sized).

Gradient receives are posted only once the backward has started (the first ``Send.backward``
of the step): a step whose loss never goes backward (an evaluation with grad on) then leaves no
receive posted that could swallow the next step's messages, and no tag is needed to tell the
steps apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.missing import naming_missing
from goose_core.engine.dependency import get_phony
from goose_core.engine.messages import Message, messages
from goose_core.engine.schedule import GPipe, Schedule
from goose_core.engine.transport import Transport

__all__ = ["DistributedTransport"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEADER = 10  # [dtype code, ndim, up to 8 sizes]


def _header(t: Tensor) -> Tensor:
    sizes = list(t.shape) + [0] * (_HEADER - 2 - t.dim())
    # On the tensor's device: NCCL moves only GPU tensors.
    return torch.tensor([_DTYPES.index(t.dtype), t.dim(), *sizes], dtype=torch.int64, device=t.device)


class _Channel:
    """The messages exchanged with one neighbour in one step, issued in the planned order.

    Args:
        transport: owns the buffers and the pending sends.
        peer: the neighbour's global rank.
        me: this rank's partition.
        plan: the messages with that neighbour, in order (both sides hold the same list).
    """

    def __init__(self, transport: DistributedTransport, peer: int, me: int, plan: list[Message]) -> None:
        self.transport, self.peer, self.me, self.plan = transport, peer, me, plan
        self.index = {m.key: k for k, m in enumerate(plan)}
        self.issued = 0  # plan[:issued] are sent or posted
        self.held: dict[tuple[str, int], Tensor] = {}  # sends handed over before their turn
        self.posted: dict[tuple[str, int], tuple[Any, Tensor]] = {}

    def _position(self, key: tuple[str, int]) -> int:
        if key not in self.index:
            raise RuntimeError(f"{key[0]} of micro-batch {key[1]} is not a planned message between "
                               f"partition {self.me} and rank {self.peer}; planned: {self.plan}")
        return self.index[key]

    def send(self, key: tuple[str, int], t: Tensor) -> None:
        k = self._position(key)
        self.held[key] = t.detach().contiguous()
        self._issue(k)  # the receives planned before it, then as far as the held sends reach

    def recv(self, key: tuple[str, int]) -> Tensor:
        k = self._position(key)
        self._issue(k + 1)
        if self.issued <= k:
            blocked = self.plan[self.issued]
            raise RuntimeError(f"partition {self.me} waits for {key[0]} {key[1]} before sending "
                               f"{blocked.kind} {blocked.microbatch}, which the schedule orders first")
        ahead = self.plan[k + 1] if k + 1 < len(self.plan) else None
        if ahead is not None and ahead.dst == self.me and ahead.kind == key[0]:
            self._issue(k + 2)  # in flight while this micro-batch computes
        work, buf = self.posted.pop(key)
        with naming_missing(peer=self.peer):
            work.wait()
        return buf

    def _issue(self, upto: int) -> None:
        """Issue planned messages in order: receives before ``upto``, sends once handed over."""
        while self.issued < len(self.plan):
            m = self.plan[self.issued]
            if m.src == self.me:
                if m.key not in self.held:
                    return
                self.transport._isend(self.held.pop(m.key), self.peer)
            elif self.issued < upto:
                buf = self.transport._buffer(m.kind)
                self.posted[m.key] = (dist.irecv(buf, self.peer, group=self.transport.group, tag=0), buf)
            else:
                return
            self.issued += 1

    def check_sent(self) -> None:
        if self.held:
            missing = [m for m in self.plan[self.issued:] if m.src == self.me and m.key not in self.held]
            raise RuntimeError(f"partition {self.me} holds {sorted(self.held)} for rank {self.peer}, "
                               f"waiting for {missing[0] if missing else '?'} that autograd never sent")


class DistributedTransport(Transport):
    """The boundary between this rank's partition and its pipeline neighbours.

    Args:
        group: the pipeline-parallel process group.
        prev_rank: global rank of the previous stage (None on the first).
        next_rank: global rank of the next stage (None on the last).
        device: where received tensors are allocated.
    """

    def __init__(self, group: Any, prev_rank: int | None, next_rank: int | None,
                 device: torch.device) -> None:
        self.group, self.prev_rank, self.next_rank, self.device = group, prev_rank, next_rank, device
        self.begin(1, False)

    def begin(self, num_microbatches: int, requires_grad: bool, schedule: Schedule | None = None) -> None:
        self.num_microbatches = num_microbatches
        self.requires_grad = requires_grad
        self.schedule = schedule
        self.sends: list[tuple[Any, Tensor, int]] = []  # (work, tensor kept alive until sent, peer)
        self.like: Tensor | None = None  # shape/dtype template of received activations
        self.sent_like: Tensor | None = None  # ... of sent activations (their gradients' too)
        self.channels: dict[str, _Channel] = {}

    def _channels(self, partition: int) -> dict[str, _Channel]:
        """This step's channels, planned on first use (the partition comes with send/recv)."""
        if not self.channels:
            # Without a schedule: GPipe's (its per-partition orders do not depend on the depth).
            schedule = self.schedule or GPipe(self.num_microbatches, partition + 2)
            plan = messages(schedule, partition, self.requires_grad)
            for side, rank, peer in (("prev", self.prev_rank, partition - 1),
                                     ("next", self.next_rank, partition + 1)):
                if rank is not None:
                    self.channels[side] = _Channel(self, rank, partition, plan[peer])
        return self.channels

    # -- the channels call these ---------------------------------------------------------------
    def _isend(self, t: Tensor, dst: int) -> None:
        self.sends.append((dist.isend(t, dst, group=self.group, tag=0), t, dst))

    def _buffer(self, kind: str) -> Tensor:
        if kind == "header":
            return torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        like = self.like if kind == "activation" else self.sent_like
        assert like is not None, f"{kind} received before its shape is known"
        return torch.empty_like(like, device=self.device)

    # -- forward ---------------------------------------------------------------------------
    def send(self, output: Tensor, microbatch: int, partition: int) -> Tensor | None:
        assert self.next_rank is not None
        channel = self._channels(partition)["next"]
        if self.sent_like is None:
            self.sent_like = torch.empty_like(output, device="meta")
            channel.send(("header", -1), _header(output))
        if not (self.requires_grad and output.requires_grad):
            channel.send(("activation", microbatch), output)
            return None
        return Send.apply(output, self, microbatch)

    def recv(self, microbatch: int, partition: int) -> Tensor:
        channel = self._channels(partition)["prev"]
        if self.like is None:
            self.like = _parse_header(channel.recv(("header", -1)))
        x = channel.recv(("activation", microbatch))
        if not self.requires_grad:
            return x
        return Recv.apply(get_phony(self.device, requires_grad=True), x, self, microbatch)

    def end_forward(self) -> None:
        self._drain()

    def end_backward(self) -> None:
        for channel in self.channels.values():
            channel.check_sent()
        self._drain()

    def deliver_sent(self) -> None:
        for work, _, _ in self.sends:
            try:
                work.wait()
            except RuntimeError:  # the peer stopped too: nothing left to deliver to it
                pass
        self.sends = []

    def _drain(self) -> None:
        for work, _, peer in self.sends:
            with naming_missing(peer=peer):
                work.wait()
        self.sends = []


def _parse_header(header: Tensor) -> Tensor:
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    return torch.empty([int(s) for s in header[2:2 + ndim]], dtype=dtype, device="meta")


class Send(torch.autograd.Function):
    """Forward: isend the activation. Backward: receive its gradient (the first call of a step
    posts the step's gradient receives, in the planned order)."""

    @staticmethod
    def forward(ctx, output: Tensor, transport: DistributedTransport,  # type: ignore[override]
                microbatch: int) -> Tensor:
        transport.channels["next"].send(("activation", microbatch), output)
        ctx.channel, ctx.microbatch = transport.channels["next"], microbatch
        return get_phony(output.device, requires_grad=False).detach()

    @staticmethod
    def backward(ctx, grad_phony: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = ctx.channel.recv(("gradient", ctx.microbatch))
        del ctx.channel
        return grad, None, None


class Recv(torch.autograd.Function):
    """Forward: the received activation, as a tensor of the graph. Backward: send its gradient
    (held by the channel until the gradients planned before it are out)."""

    @staticmethod
    def forward(ctx, phony: Tensor, received: Tensor,  # type: ignore[override]
                transport: DistributedTransport, microbatch: int) -> Tensor:
        ctx.channel, ctx.microbatch = transport.channels["prev"], microbatch
        return received.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        ctx.channel.send(("gradient", ctx.microbatch), grad)
        return None, None, None, None
