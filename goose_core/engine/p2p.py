"""The distributed transport: partitions on ranks, activations and gradients by isend/irecv.

The autograd graph is cut at every rank boundary and stitched back by two functions::

    rank j                                        rank j+1
    y ──Send──► phony (kept by the loss)          Recv ──► x ──► cell ...
        forward:  isend y ═══════════════════════► irecv x (posted one micro-batch ahead)
        backward: irecv grad y ◄══════════════════ isend grad x

No message carries a meaningful tag (NCCL ignores tags): each neighbour rank is a
:class:`_Channel` (every boundary with that rank: several with virtual stages) that issues the messages :func:`~goose_core.engine.messages.messages` derives from the
schedule, strictly in that order, on both sides. A send that autograd hands over before its
turn is held until the messages before it are out; a receive is posted when it (or a later
message of its channel) is needed, plus one ahead so it is in flight while the current
micro-batch computes. Shapes and dtype are exchanged once per step and boundary (micro-batches
are equal-sized).

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

Slot = tuple[str, int, int]  # (kind, micro-batch, boundary): a message among a pair's

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEADER = 10  # [dtype code, ndim, up to 8 sizes]


def _header(t: Tensor) -> Tensor:
    sizes = list(t.shape) + [0] * (_HEADER - 2 - t.dim())
    # On the tensor's device: NCCL moves only GPU tensors.
    return torch.tensor([_DTYPES.index(t.dtype), t.dim(), *sizes], dtype=torch.int64, device=t.device)


class _Channel:
    """The messages exchanged with one neighbour rank in one step, issued in the planned order.

    Args:
        transport: owns the buffers and the pending sends.
        peer: the neighbour's global rank.
        me: this rank's place in the pipeline.
        plan: the messages with that neighbour, in order (both sides hold the same list).
        outgoing: for each message of ``plan``, whether this rank sends it.
    """

    def __init__(self, transport: DistributedTransport, peer: int, me: int, plan: list[Message],
                 outgoing: list[bool]) -> None:
        self.transport, self.peer, self.me, self.plan, self.outgoing = transport, peer, me, plan, outgoing
        self.index = {m.slot: k for k, m in enumerate(plan)}
        self.issued = 0  # plan[:issued] are sent or posted
        self.held: dict[Slot, Tensor] = {}  # sends handed over before their turn
        self.posted: dict[Slot, tuple[Any, Tensor]] = {}

    def _position(self, slot: Slot) -> int:
        if slot not in self.index:
            raise RuntimeError(f"{slot[0]} of micro-batch {slot[1]} across boundary {slot[2]}|{slot[2] + 1} "
                               f"is not a planned message between rank {self.me} of the pipeline and "
                               f"rank {self.peer}; planned: {self.plan}")
        return self.index[slot]

    def send(self, slot: Slot, t: Tensor) -> None:
        k = self._position(slot)
        self.held[slot] = t.detach().contiguous()
        self._issue(k)  # the receives planned before it, then as far as the held sends reach

    def recv(self, slot: Slot) -> Tensor:
        k = self._position(slot)
        self._issue(k + 1)
        if self.issued <= k:
            blocked = self.plan[self.issued]
            raise RuntimeError(f"rank {self.me} of the pipeline waits for {slot[0]} {slot[1]} before "
                               f"sending {blocked.kind} {blocked.microbatch}, which the schedule orders first")
        ahead = k + 1 < len(self.plan) and not self.outgoing[k + 1] and self.plan[k + 1].kind == slot[0]
        if ahead:
            self._issue(k + 2)  # in flight while this micro-batch computes
        work, buf = self.posted.pop(slot)
        with naming_missing(peer=self.peer):
            work.wait()
        return buf

    def _issue(self, upto: int) -> None:
        """Issue planned messages in order: receives before ``upto``, sends once handed over."""
        while self.issued < len(self.plan):
            m = self.plan[self.issued]
            if self.outgoing[self.issued]:
                if m.slot not in self.held:
                    return
                self.transport._isend(self.held.pop(m.slot), self.peer)
            elif self.issued < upto:
                buf = self.transport._buffer(m, self)
                self.posted[m.slot] = (dist.irecv(buf, self.peer, group=self.transport.group, tag=0), buf)
            else:
                return
            self.issued += 1

    def header(self, boundary: int) -> Tensor:
        """The shape template of ``boundary``'s activations, from its header (received now if
        posted and not yet waited for: a later receive of that boundary needs a buffer)."""
        shapes = self.transport.shapes
        if boundary not in shapes:
            slot = ("header", -1, boundary)
            k = self._position(slot)
            self._issue(k + 1)
            if slot not in self.posted:
                raise RuntimeError(f"rank {self.me} of the pipeline waits for the header of boundary "
                                   f"{boundary}|{boundary + 1} behind {self.plan[self.issued]}, unsent")
            work, buf = self.posted.pop(slot)
            with naming_missing(peer=self.peer):
                work.wait()
            shapes[boundary] = _parse_header(buf)
        return shapes[boundary]

    def check_sent(self) -> None:
        if self.held:
            missing = [m for k, m in enumerate(self.plan[self.issued:], self.issued)
                       if self.outgoing[k] and m.slot not in self.held]
            raise RuntimeError(f"rank {self.me} of the pipeline holds {sorted(self.held)} for rank "
                               f"{self.peer}, waiting for {missing[0] if missing else '?'} that autograd never sent")


class DistributedTransport(Transport):
    """The boundaries between this rank's partitions and its pipeline neighbours.

    Args:
        group: the pipeline-parallel process group.
        prev_rank: global rank of the previous stage (None on the first).
        next_rank: global rank of the next stage (None on the last).
        device: where received tensors are allocated.
        ranks: the global ranks of the whole pipeline in stage order; needed when a rank holds
            several partitions (virtual stages: the schedule places partitions on them, and the
            last rank sends to the first). Default: ``prev_rank`` and ``next_rank`` only.
    """

    connected = False  # the graph is cut at every boundary

    def __init__(self, group: Any, prev_rank: int | None, next_rank: int | None,
                 device: torch.device, ranks: list[int] | None = None) -> None:
        self.group, self.prev_rank, self.next_rank, self.device = group, prev_rank, next_rank, device
        self.ranks = ranks
        self.begin(1, False)

    def begin(self, num_microbatches: int, requires_grad: bool, schedule: Schedule | None = None) -> None:
        self.num_microbatches = num_microbatches
        self.requires_grad = requires_grad
        self.schedule = schedule
        self.sends: list[tuple[Any, Tensor, int]] = []  # (work, tensor kept alive until sent, peer)
        self.shapes: dict[int, Tensor] = {}  # boundary -> shape/dtype template of its activations
        self.channels: dict[int, _Channel] = {}  # by the neighbour's place in the pipeline
        self.local: dict[tuple[int, int], Tensor] = {}  # (micro-batch, partition) handed over here

    def _global(self, me: int, peer: int) -> int:
        if self.ranks is not None:
            return self.ranks[peer]
        rank = self.prev_rank if peer < me else self.next_rank
        assert rank is not None, f"rank {me} of the pipeline has no neighbour {peer}"
        return rank

    def _channel(self, partition: int, neighbour: int) -> _Channel:
        """The channel to the rank of partition ``neighbour``; this step's channels are planned on
        first use (the partition comes with send/recv)."""
        # Without a schedule: GPipe's (its per-partition orders do not depend on the depth).
        schedule = self.schedule or GPipe(self.num_microbatches, max(partition, neighbour) + 1)
        me = schedule.rank_of(partition)
        if not self.channels:
            for peer, plan in messages(schedule, me, self.requires_grad).items():
                outgoing = [schedule.rank_of(m.src) == me for m in plan]
                self.channels[peer] = _Channel(self, self._global(me, peer), me, plan, outgoing)
        return self.channels[schedule.rank_of(neighbour)]

    # -- the channels call these ---------------------------------------------------------------
    def _isend(self, t: Tensor, dst: int) -> None:
        self.sends.append((dist.isend(t, dst, group=self.group, tag=0), t, dst))

    def _buffer(self, message: Message, channel: _Channel) -> Tensor:
        if message.kind == "header":
            return torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        like = self.shapes.get(message.boundary)
        if like is None and message.kind == "activation":
            like = channel.header(message.boundary)
        assert like is not None, f"{message.kind} received before its shape is known"
        return torch.empty_like(like, device=self.device)

    def joins(self, partition: int) -> bool:
        """Partitions ``partition - 1`` and ``partition`` on this rank (ZBV's turn at rank p-1):
        handed over in memory, the graph connected."""
        schedule = self.schedule
        return schedule is not None and schedule.rank_of(partition - 1) == schedule.rank_of(partition)

    # -- forward ---------------------------------------------------------------------------
    def send(self, output: Tensor, microbatch: int, partition: int) -> Tensor | None:
        if self.joins(partition + 1):
            self.local[(microbatch, partition + 1)] = output
            return None
        channel = self._channel(partition, partition + 1)
        if partition not in self.shapes:
            self.shapes[partition] = torch.empty_like(output, device="meta")
            channel.send(("header", -1, partition), _header(output))
        if not (self.requires_grad and output.requires_grad):
            channel.send(("activation", microbatch, partition), output)
            return None
        return Send.apply(output, channel, microbatch, partition)

    def recv(self, microbatch: int, partition: int) -> Tensor:
        if self.joins(partition):
            return self.local.pop((microbatch, partition))
        channel = self._channel(partition, partition - 1)
        channel.header(partition - 1)
        x = channel.recv(("activation", microbatch, partition - 1))
        if not self.requires_grad:
            return x
        return Recv.apply(get_phony(self.device, requires_grad=True), x, channel, microbatch, partition - 1)

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
    def forward(ctx, output: Tensor, channel: _Channel, microbatch: int,  # type: ignore[override]
                boundary: int) -> Tensor:
        channel.send(("activation", microbatch, boundary), output)
        ctx.channel, ctx.slot = channel, ("gradient", microbatch, boundary)
        return get_phony(output.device, requires_grad=False).detach()

    @staticmethod
    def backward(ctx, grad_phony: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        grad = ctx.channel.recv(ctx.slot)
        del ctx.channel
        return grad, None, None, None


class Recv(torch.autograd.Function):
    """Forward: the received activation, as a tensor of the graph. Backward: send its gradient
    (held by the channel until the gradients planned before it are out)."""

    @staticmethod
    def forward(ctx, phony: Tensor, received: Tensor, channel: _Channel,  # type: ignore[override]
                microbatch: int, boundary: int) -> Tensor:
        ctx.channel, ctx.slot = channel, ("gradient", microbatch, boundary)
        return received.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None, None]:  # type: ignore[override]
        ctx.channel.send(ctx.slot, grad)
        return None, None, None, None, None
