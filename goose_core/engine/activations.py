"""Activation memory, measured: bytes saved for backward alive at once, and micro-batches in flight.

The point of 1F1B is memory: a partition holds the activations of the micro-batches whose
forward has run and whose backward has not ("in flight"), at most ``min(p - j, M)`` on partition
j against GPipe's M. Two measurements that need no GPU::

    with LiveActivations(model.parameters()) as live:    # every tensor autograd saves, until freed
        model(**batch).loss.backward()
    live.peak                                            # most bytes alive at once

    flight = InFlight(); model.callbacks.add(flight)     # forward done +1, backward done -1
    flight.peak[0]                                       # most micro-batches in flight on partition 0
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from goose_core.engine.callbacks import Callback, Event

__all__ = ["LiveActivations", "InFlight"]


class _Saved:
    """A tensor saved for backward; autograd drops it (and this) when the graph frees it."""

    def __init__(self, tensor: Tensor, live: "LiveActivations", key: int) -> None:
        self.tensor, self.live, self.key = tensor, live, key

    def __del__(self) -> None:
        self.live._release(self.key)


class LiveActivations:
    """Bytes of tensors saved for backward that are alive, now and at most (``peak``).

    Counts each storage once however many saves share it, and never the parameters' (the
    weights a layer saves are not activations). A context manager: saves made inside are
    tracked until the graph frees them, wherever the backward runs.

    Args:
        params: the parameters whose storage is not counted.
    """

    def __init__(self, params: Iterable[nn.Parameter] = ()) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage -> [saves alive, bytes]
        self.bytes = 0
        self.peak = 0
        self._hooks: Any = None

    def __enter__(self) -> "LiveActivations":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.skip or t.device.type == "meta":
            return t
        if key not in self.refs:
            self.refs[key] = [0, t.untyped_storage().nbytes()]
            self.bytes += self.refs[key][1]
            self.peak = max(self.peak, self.bytes)
        self.refs[key][0] += 1
        # Detached: a saved *output* holding its own grad_fn would close a cycle through autograd's
        # C++ graph, which Python's collector cannot see (a graph kept across a backward, as a
        # split backward keeps it from B to W, would then never be freed).
        return _Saved(t.detach(), self, key)

    @staticmethod
    def _unpack(saved: Any) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.bytes -= ref[1]
            del self.refs[key]


class InFlight(Callback):
    """A pipeline callback counting, per partition, micro-batches whose forward has ended and
    whose backward has not; ``peak[j]`` is the most at once on partition j."""

    def __init__(self) -> None:
        super().__init__(self._count, kinds=["forward", "backward"])
        self.now: dict[int, int] = defaultdict(int)
        self.peak: dict[int, int] = defaultdict(int)

    def _count(self, event: Event) -> None:
        j = event.partition_idx
        if event.phase == "after" and event.kind == "forward" and torch.is_grad_enabled():
            self.now[j] += 1
            self.peak[j] = max(self.peak[j], self.now[j])
        elif event.phase == "after" and event.kind == "backward":
            self.now[j] -= 1
