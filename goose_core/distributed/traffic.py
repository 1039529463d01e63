"""Traffic: the bytes this rank sends, per process group, counted by wrapping torch.distributed.

Inside ``with count_traffic(ctx) as traffic:`` every collective and point-to-point send that
goes through ``torch.distributed``'s functions adds what this rank sends to
``traffic.bytes[name]``, ``name`` being the group's axis (``"tp"``, ``"pp"``, ``"dp"``), an
expert-parallel group (``"ep"``, ``"edp"``), ``"world"`` or ``"other"``. Nothing changes what
runs: each wrapper calls the original.

What "sent" means: a collective's bytes are those of a bandwidth-optimal algorithm (the ring)
over its ``n`` ranks, divided evenly among them, for a tensor of ``S`` bytes::

    collective                         bytes this rank sends        note
    all_reduce(S)                      2 (n-1)/n S                  = reduce-scatter + all-gather
    reduce_scatter(input S)            (n-1)/n S
    all_gather(output S)               (n-1)/n S                    list form: S = n x the input
    broadcast(S)                       (n-1)/n S                    n broadcasts of S/n (ZeRO-1's
                                                                    all-gather on gloo) = one all-gather
    all_to_all_single(S)               (n-1)/n S                    uneven splits: S less the
                                                                    slice this rank keeps
    send / isend (S), P2POp isend      S                            recv: 0
    a group of one rank                0

so the figures add up the way the ZeRO formulas of :mod:`goose_core.optim.zero_cost` do (plain
DP's all-reduce is its reduce-scatter plus its all-gather). Object collectives (``*_object``:
pickled metadata, not training traffic) are not counted. Counts are ``Fraction``s, exact.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import Tensor

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.grid import AXES

__all__ = ["Call", "Traffic", "count_traffic"]


@dataclass(frozen=True)
class Call:
    """One counted call: the function, its group's name and size, and the bytes this rank sent."""

    op: str
    group: str
    ranks: int
    sent: Fraction


@dataclass
class Traffic:
    """Bytes this rank sent inside one ``count_traffic`` block."""

    calls: list[Call] = field(default_factory=list)

    @property
    def bytes(self) -> dict[str, Fraction]:
        """Bytes sent per group name (groups never used are absent)."""
        out: dict[str, Fraction] = defaultdict(Fraction)
        for call in self.calls:
            out[call.group] += call.sent
        return dict(out)

    def __getitem__(self, group: str) -> Fraction:
        return self.bytes.get(group, Fraction(0))

    def by_op(self, group: str) -> dict[str, Fraction]:
        """Bytes sent over ``group``, per function."""
        out: dict[str, Fraction] = defaultdict(Fraction)
        for call in self.calls:
            if call.group == group:
                out[call.op] += call.sent
        return dict(out)


def _size(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _ring(n: int, size: int, times: int = 1) -> Fraction:
    return Fraction(times * (n - 1) * size, n)


def _all_to_all(n: int, args: tuple, kwargs: dict) -> Fraction:
    """all_to_all_single(output, input, output_split_sizes, input_split_sizes, group): every
    slice of ``input`` but this rank's own leaves it; equal slices when no sizes are given."""
    tensor = args[1] if len(args) > 1 else kwargs["input"]
    splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
    if not splits or n == 1:
        return _ring(n, _size(tensor))
    group = _group_of("all_to_all_single", args, kwargs)
    mine = splits[dist.get_rank(group if group is not None else dist.group.WORLD)]
    row = _size(tensor) // tensor.shape[0] if tensor.shape[0] else 0
    return Fraction(_size(tensor) - mine * row)


# How many bytes a call sends: f(n, args, kwargs), n the group's size.
_SENT: dict[str, Callable[[int, tuple, dict], Fraction]] = {
    "all_reduce": lambda n, a, k: _ring(n, _size(a[0]), 2),
    "reduce_scatter_single": lambda n, a, k: _ring(n, _size(a[1])),
    "reduce_scatter_tensor": lambda n, a, k: _ring(n, _size(a[1])),
    "reduce_scatter": lambda n, a, k: _ring(n, sum(_size(t) for t in a[1])),
    "all_gather_single": lambda n, a, k: _ring(n, _size(a[0])),
    "all_gather_into_tensor": lambda n, a, k: _ring(n, _size(a[0])),
    "all_gather": lambda n, a, k: _ring(n, sum(_size(t) for t in a[0])),
    "broadcast": lambda n, a, k: _ring(n, _size(a[0])),
    "all_to_all_single": lambda n, a, k: _all_to_all(n, a, k),
    "send": lambda n, a, k: Fraction(_size(a[0])),
    "isend": lambda n, a, k: Fraction(_size(a[0])),
    "recv": lambda n, a, k: Fraction(0),
    "irecv": lambda n, a, k: Fraction(0),
}
_P2P = {"send", "isend", "recv", "irecv"}
_P2P_OPS = ("isend", "irecv")  # what a P2POp of batch_isend_irecv may name


def _group_of(name: str, args: tuple, kwargs: dict) -> Any:
    if "group" in kwargs:
        return kwargs["group"]
    # positional group: collectives (tensor(s), [op/src], group, ...); p2p (tensor, peer, group, tag)
    position = {"all_reduce": 2, "broadcast": 2, "send": 2, "isend": 2, "recv": 2, "irecv": 2,
                "all_gather": 2, "all_gather_single": 2, "all_gather_into_tensor": 2,
                "reduce_scatter_single": 3, "reduce_scatter_tensor": 3, "reduce_scatter": 3,
                "all_to_all_single": 4}.get(name)
    return args[position] if position is not None and len(args) > position else None


@contextmanager
def count_traffic(ctx: ParallelContext | None = None) -> Iterator[Traffic]:
    """Count the bytes this rank sends inside the block, per group (named by ``ctx``'s axes).

    Patches ``torch.distributed``'s functions for the block's duration (one block at a time, in
    one process: the wrappers are module-wide); a call made from inside another counted call
    (a deprecated name forwarding to the new one) counts once.
    """
    names: dict[int, str] = {}
    if dist.is_initialized():
        names[id(dist.group.WORLD)] = "world"
    if ctx is not None:
        if ctx.experts.ep_group is not None:  # expert parallelism's groups (before dp: E = 1 is dp)
            names[id(ctx.experts.ep_group)] = "ep"
            names[id(ctx.experts.edp_group)] = "edp"
        for axis in AXES:
            names[id(ctx.group(axis))] = axis  # an axis beats "world" when they are one group
    traffic = Traffic()
    depth = threading.local()
    originals = {name: getattr(dist, name) for name in [*_SENT, "batch_isend_irecv"] if hasattr(dist, name)}

    def record(op: str, group: Any, sent: Fraction) -> None:
        group = group if group is not None else dist.group.WORLD
        n = dist.get_world_size(group)
        traffic.calls.append(Call(op, names.get(id(group), "other"), n, sent if n > 1 or op in _P2P else Fraction(0)))

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            outer = getattr(depth, "n", 0) == 0
            depth.n = getattr(depth, "n", 0) + 1
            try:
                if outer and name == "batch_isend_irecv":
                    for p2p in args[0]:
                        op = next(n for n in _P2P_OPS if p2p.op in (wrappers[n], originals[n]))
                        record(op, p2p.group, _SENT[op](2, (p2p.tensor,), {}))
                elif outer:
                    group = _group_of(name, args, kwargs)
                    n = dist.get_world_size(group if group is not None else dist.group.WORLD)
                    record(name, group, _SENT[name](n, args, kwargs))
                return original(*args, **kwargs)
            finally:
                depth.n -= 1
        return counted

    wrappers = {name: wrap(name, original) for name, original in originals.items()}
    # c10d's own names, kept apart: torch.distributed's may be a wrapper already (a test's), and
    # putting that into c10d on the way out would leave P2POp's check refusing torch's isend.
    c10d_originals = {name: getattr(c10d, name) for name in _P2P_OPS}
    for name, wrapper in wrappers.items():
        setattr(dist, name, wrapper)
    for name in _P2P_OPS:  # P2POp checks its op against these globals: the wrappers must pass
        setattr(c10d, name, wrappers[name])
    try:
        yield traffic
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        for name, original in c10d_originals.items():
            setattr(c10d, name, original)
