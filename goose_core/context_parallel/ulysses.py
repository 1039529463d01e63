"""Ulysses attention: an all-to-all trades the sequence split for a head split around attention.

Each of the C cp ranks holds a slice of the sequence with every head. The first all-to-all sends
head group c of its slice to rank c, so rank c holds heads c of the *whole* sequence; attention
runs there unchanged (no rank needs another's keys); the second all-to-all sends each slice of the
output back to the rank that holds it. C = 2, rank r holding positions P_r (any layout: contiguous,
load-balanced chunks i and 2C-1-i, uneven)::

                 rank 0: [b, h, P_0, d]          rank 1: [b, h, P_1, d]
                   heads 0..h/2-1 | h/2..h-1        heads 0..h/2-1 | h/2..h-1
                          |   \\__________  _________/   |
                          |               \\/            |        all-to-all 1 (q, k, v):
                          |   ___________/\\__________   |        keep 1/C, send (C-1)/C
                          v  v                        v  v
    concat by rank:  [P_0 | P_1] heads 0..h/2-1   [P_0 | P_1] heads h/2..h-1
    sort positions:  [0 1 2 ... S-1]              [0 1 2 ... S-1]   (global order restored)
    attend:          [b, h/2, S, d]               [b, h/2, S, d]
    unsort, split:   P_0 | P_1                    P_0 | P_1
                          |   \\__________  _________/   |        all-to-all 2 (output):
                          |   ___________/\\__________   |        the reverse of 1
                          v  v                        v  v
                 rank 0: [b, h, P_0, d]          rank 1: [b, h, P_1, d]

Each all-to-all (:mod:`goose_core.distributed.all_to_all`) has the reverse all-to-all for backward: a rank sends in
the backward what it received in the forward. Bytes a rank sends, per tensor (q, k, v, the output)
and per direction, with equal slices: (C-1)/C of its local ``[b, heads, s_local, d]``, forward and
backward alike (what ``count_traffic`` counts for an all-to-all). With uneven slices, the head
split stays even, so a head-splitting all-to-all sends (C-1)/C of its ``[b, heads, s_local, d]``,
and a sequence-splitting one ``(S - s_local) / S`` of its ``[b, heads/C, S, d]``.

GQA: key/value heads travel split by C too. When C does not divide their count h_kv, each kv head
is repeated ``lcm(h_kv, C) / h_kv`` times in a row (the Ulysses of long-context-attention and of
verl repeat them too). h is a multiple of both h_kv and C, hence of their lcm: the repeated heads
still group the query heads evenly, and query head j meets a copy of kv head j // (h / h_kv).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.all_to_all import all_to_all

__all__ = ["ulysses_attention", "kv_repeats"]

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def kv_repeats(kv_heads: int, cp: int) -> int:
    """How many copies of each kv head Ulysses sends: the least r with cp | r * kv_heads
    (``lcm(kv_heads, cp) / kv_heads``); 1 when cp divides kv_heads already."""
    return cp // math.gcd(kv_heads, cp)


def _check(query: Tensor, key: Tensor, value: Tensor, cp: int, rank: int,
           positions: Sequence[Tensor]) -> Tensor:
    """Refuse bad input by name, before any collective; return the concatenated positions."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % cp:
        raise ValueError(f"num_attention_heads={heads} not divisible by context_parallel_size={cp}: "
                         f"use method='ring'")
    if kv_heads < 1 or heads % kv_heads or value.shape[1] != kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of the key/value heads (key {kv_heads}, "
                         f"value {value.shape[1]}): give key and value [b, h_kv, s_local, d] with h_kv | h")
    if len(positions) != cp:
        raise ValueError(f"positions has {len(positions)} entries, the cp group {cp} ranks: give one "
                         f"tensor of global positions per cp rank")
    if any(p.dim() != 1 or p.is_floating_point() for p in positions):
        raise ValueError("positions must be 1-D integer tensors (the global positions each cp rank holds)")
    local = positions[rank].numel()
    if not query.shape[2] == key.shape[2] == value.shape[2] == local:
        raise ValueError(f"cp rank {rank} holds {local} positions (positions[{rank}]) but query/key/value "
                         f"have {query.shape[2]}/{key.shape[2]}/{value.shape[2]}: give each rank its own slice")
    flat = torch.cat([p.to(query.device) for p in positions])
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("positions repeat a global position: each position belongs to exactly one cp rank")
    return flat


def _orders(flat: Tensor) -> tuple[Tensor, Tensor]:
    """(order, unsort): ``sorted = by_rank[order]`` restores the global order of the positions the
    all-to-all concatenated rank by rank; ``by_rank = sorted[unsort]`` undoes it."""
    order = torch.argsort(flat)
    return order, torch.argsort(order)


def _repeat_kv(x: Tensor, repeats: int) -> Tensor:
    """Each kv head ``repeats`` times in a row, [0 0 1 1] not [0 1 0 1]: repeated head i holds
    kv head i // repeats, so query head j's kv head j // (h / h_kv) is where the local GQA rule
    j_local // (h / (h_kv repeats)) looks (``tests/test_ulysses.py`` walks every head)."""
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=1)


def ulysses_attention(query: Tensor, key: Tensor, value: Tensor, *, group: dist.ProcessGroup,
                      positions: Sequence[Tensor], attend: Attend) -> Tensor:
    """Attention over the whole sequence for this cp rank's slice, heads split over ``group``.

    Args:
        query: ``[b, h, s_local, d]`` (🤗's attention-interface layout), this rank's slice.
        key: ``[b, h_kv, s_local, d]``, the same slice.
        value: ``[b, h_kv, s_local, d_v]``, the same slice.
        group: the cp group, C ranks; C must divide h.
        positions: ``positions[r]``, the global positions cp rank r holds, in the order of its
            slice (same on every rank); ranks may hold different counts. The full sequence is
            laid out in increasing position order for ``attend``.
        attend: ``attend(q, k, v)`` on the full sequence, ``q [b, h/C, S, d]``, ``k, v [b,
            h_kv'/C, S, d]`` (h_kv' = h_kv * :func:`kv_repeats`: its GQA group is
            ``q.shape[1] // k.shape[1]``, read it from the shapes), returning ``[b, h/C, S, d_v]``.

    Returns:
        ``[b, h, s_local, d_v]``: this rank's slice of the output. Differentiable.

    Raises:
        ValueError: on every rank, before any collective: h not divisible by C, h not a multiple
            of h_kv, ``positions`` of the wrong count, type or with a repeat; on the rank whose
            slice length differs from its ``positions`` entry.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    flat = _check(query, key, value, cp, rank, positions)
    order, unsort = _orders(flat)
    lengths = [p.numel() for p in positions]
    heads = query.shape[1]
    repeats = kv_repeats(key.shape[1], cp)
    key, value = _repeat_kv(key, repeats), _repeat_kv(value, repeats)

    def to_heads(x: Tensor) -> Tensor:  # all-to-all 1, then the global order
        if cp > 1:
            x = all_to_all(x, group, (1, [x.shape[1] // cp] * cp), (2, lengths))
        return x.index_select(2, order)

    out = attend(to_heads(query), to_heads(key), to_heads(value))
    expected = (query.shape[0], heads // cp, flat.numel(), value.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"attend returned {tuple(out.shape)}, expected {expected} ([b, h/C, S, d_v])")
    out = out.index_select(2, unsort)
    if cp > 1:  # all-to-all 2: the reverse of 1
        out = all_to_all(out, group, (2, lengths), (1, [heads // cp] * cp))
    return out
