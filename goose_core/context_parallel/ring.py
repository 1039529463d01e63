"""Ring attention: exact attention over a sequence split across the cp ranks, key/value blocks
passed around the ring and merged with the online-softmax rule; the backward passes dK/dV too.

Each cp rank holds the queries, keys and values of its own positions. At step j rank r holds
the key/value block of rank (r - j) mod C, scores its queries against it under the global
mask, and merges the partial result into its running (max, sum, output); meanwhile the block
travels on to rank r + 1. After C steps every query has met every key, once::

    C = 4           step 0    step 1    step 2    step 3
    rank 0 holds    KV0       KV3       KV2       KV1       each step: scores, merge, pass on
    rank 1 holds    KV1       KV0       KV3       KV2
    rank 2 holds    KV2       KV1       KV0       KV3
    rank 3 holds    KV3       KV2       KV1       KV0

    merge (online softmax), per query row, block scores s:
        m' = max(m, max s)     l' = l e^(m - m') + sum e^(s - m')     o' = o e^(m - m') + e^(s - m') V
    after the last block: out = o / l

The backward walks the ring again (flash attention's rule, P recomputed from the kept m and l):
each block's dK, dV ride with it and arrive home one step after the last, summed over every rank.

The mask is 🤗's eager one, term for term: a forbidden score gets the dtype's minimum added (not
-inf), so a query that may see no key at all (a left-pad position) attends uniformly to every
key, as the single-device eager attention does; its output (and gradient) is then what one
device computes, not a NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.missing import naming_missing

__all__ = ["RingSpec", "ring_attention", "allowed", "scores", "expand", "fold"]


@dataclass(frozen=True)
class RingSpec:
    """What every attention call of one forward shares: the ring, who holds which positions, which
    keys are real. ``key_mask`` [b, S] (global order; True = a real token) or None."""

    group: dist.ProcessGroup
    positions: tuple[Tensor, ...]  # positions[r]: the global positions cp rank r holds, in order
    key_mask: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.positions)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def allowed(q_pos: Tensor, k_pos: Tensor, key_mask: Tensor | None, window: int | None) -> Tensor:
    """Which (query, key) pairs may attend, from GLOBAL positions: causal, inside the sliding
    window (🤗: q - k < window), and the key a real token. [b or 1, 1, s_q, s_k] bool."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    ok = ok[None, None]
    if key_mask is not None:
        ok = ok & key_mask[:, k_pos][:, None, None, :]
    return ok


def _ring_steps(size: int) -> int:
    """How many blocks each rank scores: every rank's, its own included."""
    return size


def scores(q: Tensor, k: Tensor, mask: Tensor, scaling: float) -> Tensor:
    """Scaled scores with 🤗's eager additive mask (the dtype's minimum where not allowed)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    bias = torch.zeros(mask.shape, dtype=s.dtype, device=s.device)
    return s + bias.masked_fill(~mask, torch.finfo(s.dtype).min)  # eager's additive mask


def expand(t: Tensor, groups: int) -> Tensor:
    """GQA: each key/value head repeated for the ``groups`` query heads that share it."""
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def fold(t: Tensor, groups: int) -> Tensor:
    """The gradient of :func:`_expand`: each kv head sums its query group's."""
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t.view(b, h // groups, groups, s, d).sum(2)


class _Ring:
    """Pass one tensor to the next rank and take one from the previous, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)
        self._works: list[Any] = []
        self._incoming: Tensor | None = None

    def start(self, t: Tensor) -> None:
        self._incoming = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group),
               dist.P2POp(dist.irecv, self._incoming, self.prev, self.group)]
        self._works = dist.batch_isend_irecv(ops)

    def finish(self) -> Tensor:
        with naming_missing(self.group):
            for work in self._works:
                work.wait()
        incoming, self._incoming, self._works = self._incoming, None, []
        assert incoming is not None
        return incoming


def _pack(*ts: Tensor) -> Tensor:
    return torch.stack(ts)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, spec: RingSpec, scaling: float,
                window: int | None) -> Tensor:
        size, rank, groups = spec.size, spec.rank, q.shape[1] // k.shape[1]
        q_pos = spec.positions[rank]
        ring = _Ring(spec.group)
        block = _pack(k, v)
        m = l = o = None
        for step in range(_ring_steps(size)):
            if step < size - 1:
                ring.start(block)  # the next block is on its way while this one is scored
            src = (rank - step) % size
            mask = allowed(q_pos, spec.positions[src], spec.key_mask, window)
            s = scores(q, expand(block[0], groups), mask, scaling)
            m_blk = s.amax(-1, keepdim=True)
            m_new = m_blk if m is None else torch.maximum(m, m_blk)
            p = torch.exp(s - m_new)
            pv = torch.matmul(p, expand(block[1], groups))
            if m is None:
                l, o = p.sum(-1, keepdim=True), pv
            else:
                scale = torch.exp(m - m_new)
                l, o = l * scale + p.sum(-1, keepdim=True), o * scale + pv
            m = m_new
            if step < size - 1:
                block = ring.finish()
        out = o / l
        ctx.save_for_backward(q, k, v, out, m, l)
        ctx.spec, ctx.scaling, ctx.window = spec, scaling, window
        return out

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, m, l = ctx.saved_tensors
        spec, scaling, window = ctx.spec, ctx.scaling, ctx.window
        size, rank, groups = spec.size, spec.rank, q.shape[1] // k.shape[1]
        q_pos = spec.positions[rank]
        delta = (d_out * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q)
        # The travelling block: k, v and the dk, dv summed so far over the ranks it visited.
        block = _pack(k, v, torch.zeros_like(k), torch.zeros_like(v))
        ring = _Ring(spec.group)
        for step in range(_ring_steps(size)):
            src = (rank - step) % size
            kx, vx = expand(block[0], groups), expand(block[1], groups)
            mask = allowed(q_pos, spec.positions[src], spec.key_mask, window)
            p = torch.exp(scores(q, kx, mask, scaling) - m) / l
            dp = torch.matmul(d_out, vx.transpose(-1, -2))
            ds = p * (dp - delta)
            dq += torch.matmul(ds, kx) * scaling
            dk = fold(torch.matmul(ds.transpose(-1, -2), q) * scaling, groups)
            dv = fold(torch.matmul(p.transpose(-1, -2), d_out), groups)
            block = _pack(block[0], block[1], block[2] + dk, block[3] + dv)
            if size > 1:  # on to the next rank; after the last step dK, dV go home
                ring.start(block if step < size - 1 else block[2:])
                block = ring.finish()
        dk, dv = (block[2], block[3]) if size == 1 else (block[0], block[1])
        return dq, dk, dv, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, spec: RingSpec, scaling: float,
                   window: int | None = None) -> Tensor:
    """Attention of this rank's queries over every rank's keys: [b, h, s_local, d].

    ``query`` [b, h, s_local, d], ``key``/``value`` [b, h_kv, s_local, d] (h_kv divides h: GQA's
    groups are expanded here and their gradients summed back), positions and padding from
    ``spec``. Differentiable; every cp rank of ``spec.group`` calls it together.
    """
    return _RingAttention.apply(query, key, value, spec, scaling, window)

