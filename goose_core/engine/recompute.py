"""Recompute: a cell's forward keeps no activations, and rebuilds them just before its backward.

Two autograd functions share one record. ``Discard`` runs a cell's forward without keeping its
activations (only its input and the RNG state). ``Recompute`` is a separate node that re-runs that
forward with autograd on; it is joined into the graph (see :mod:`goose_core.engine.dependency`) so
autograd runs it before the cell's backward, at a moment the executor chooses: just after the
*previous* cell's backward, while this cell's incoming gradient may still be in flight. The two
share a :class:`Recomputation` record: Recompute leaves the rebuilt graph there, Discard's backward
runs it::

    forward:   x ──► Discard(no_grad) ──► y              (x and the RNG state kept)
                          │ shared record
    backward:  phony ─► Recompute: rebuild y with grad ─┐
               grad y ─► Discard.backward: backward through the rebuilt y, return grad x

The replay runs under the forward's RNG state (CPU and the input's CUDA device), the forward's
autocast state (CPU and the input's device type) and the forward's torch function modes, so
dropout draws the same masks, every op runs in the same dtype and as the forward ran it, and
recomputing changes no bit of the gradients. The backward usually runs
outside the ``torch.autocast`` block of the forward: a replay under the backward's state would
recompute a bf16 forward in fp32 and differentiate another function. (One exception under
autocast, by design: micro-batches that keep their activations share the autocast cache's bf16
cast of a weight, so their weight gradients add up in bf16 first, while a recomputed cell casts
afresh and its gradient joins in fp32; ``torch.autocast(..., cache_enabled=False)`` makes the two
bit-identical, at a bf16 copy of the stage's weights per micro-batch in flight.)

A schedule that splits each backward into an input and a weight gradient (zero bubble) hands the
record a :class:`SplitReplay`: it watches the replay, and differentiates the rebuilt graph its own
way (the input gradient now, the weights later) instead of all at once.

This is what other libraries call activation checkpointing; here "checkpoint" means only a saved
run (:mod:`goose_core.checkpoint`).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator, Literal, Protocol

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from goose_core.engine.callbacks import CallbackList

__all__ = ["MODES", "RecomputeMode", "Recomputation", "SplitReplay", "is_recomputing", "recompute_stop",
           "will_recompute"]

RecomputeMode = Literal["always", "except_last", "never"]
MODES: tuple[RecomputeMode, ...] = ("always", "except_last", "never")

_state = threading.local()


def recompute_stop(mode: str, num_microbatches: int) -> int:
    """Micro-batches ``i < stop`` are recomputed.

    ``except_last`` keeps the last micro-batch's activations: its backward starts right after its
    forward, so recomputing it would buy no memory.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {list(MODES)}")
    return {"always": num_microbatches, "except_last": num_microbatches - 1, "never": 0}[mode]


@contextmanager
def _flag(name: str) -> Iterator[None]:
    old = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, old)


def is_recomputing() -> bool:
    """True inside a recompute: a layer that must act once per step (e.g. count tokens) can skip."""
    return getattr(_state, "recomputing", False)


def will_recompute() -> bool:
    """True inside a forward that keeps no activations (it will be recomputed)."""
    return getattr(_state, "discarding", False)


def _rng_devices(x: Tensor) -> list[torch.device]:
    return [x.device] if x.is_cuda else []


class SplitReplay(Protocol):
    """How a split backward takes over a rebuilt cell (:class:`~goose_core.engine.split_backward.SplitCells`)."""

    def replaying(self, cell: tuple[int, int]) -> AbstractContextManager[None]:
        """Open around the replay of ``cell``'s forward."""
        ...

    def backward(self, cell: tuple[int, int], output: Tensor, leaf: Tensor, grad: Tensor) -> Tensor | None:
        """Differentiate the rebuilt ``output`` (seed ``grad``): return the gradient at ``leaf``."""
        ...


class Recomputation:
    """One recomputed cell: its function, its input, its RNG state, its rebuilt graph.

    Args:
        function: the cell's forward, one tensor in, one tensor out.
        input: the cell's input (may or may not require grad).
        cell: (micro-batch, partition), for the recompute callbacks.
        callbacks: fired around the recompute.
        split: a split backward's handling of the rebuilt graph (None: its whole backward at once).
    """

    def __init__(self, function: Callable[[Tensor], Tensor], input: Tensor, cell: tuple[int, int],
                 callbacks: CallbackList, split: SplitReplay | None = None) -> None:
        self.function = function
        self.split = split
        self.input: Tensor | None = input
        self.cell = cell
        self.callbacks = callbacks
        self.devices = _rng_devices(input)
        self.cpu_rng: Tensor | None = None
        self.cuda_rng: list[Tensor] = []
        self.device_types = sorted({"cpu", input.device.type})
        self.autocast: list[tuple[str, bool, torch.dtype]] = []
        self.autocast_cache = True
        self.modes: list[TorchFunctionMode] = []
        self.rebuilt: tuple[Tensor, Tensor] | None = None  # (output, input leaf)

    def run(self, phony: Tensor) -> Tensor:
        """The cell's output, computed without saving activations. ``phony`` must require grad
        so the output is part of the graph even when the input is not."""
        self.modes = _function_modes()
        return Discard.apply(phony, self, self.input)

    def recompute(self, phony: Tensor) -> Tensor:
        """A phony whose backward rebuilds the cell's graph (join it where the rebuild should run).

        From here on only the Recompute node holds the input (saved for backward, so saved-tensor
        hooks see it like any other activation)."""
        phony = Recompute.apply(phony, self, self.input)
        self.input = None
        return phony

    def save_rng(self) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def restored_rng(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            assert self.cpu_rng is not None
            torch.set_rng_state(self.cpu_rng)
            for device, state in zip(self.devices, self.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            yield

    def save_autocast(self) -> None:
        self.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in self.device_types]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextmanager
    def restored_autocast(self) -> Iterator[None]:
        """The forward's autocast state, enabled or not, for every device type it ran on."""
        with ExitStack() as stack:
            for device_type, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.autocast_cache))
            yield

    @contextmanager
    def restored_modes(self) -> Iterator[None]:
        """The torch function modes the forward ran under (``with torch.device(...)``, a
        harness's float32 widening): the autograd engine runs a backward without the caller's
        mode stack (even a backward inside the ``with`` block), so the recompute would replay
        the forward's ops without them."""
        with ExitStack() as stack:
            for mode in self.modes:
                stack.enter_context(mode)
            yield


def _function_modes() -> list[TorchFunctionMode]:
    """The torch function mode stack, innermost last."""
    return list(_get_current_function_mode_stack())


class Discard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phony: Tensor, record: Recomputation, input: Tensor) -> Tensor:  # type: ignore[override]
        ctx.record = record
        record.save_rng()
        record.save_autocast()
        with torch.no_grad(), _flag("discarding"):
            return record.function(input)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, None, Tensor | None]:  # type: ignore[override]
        record: Recomputation = ctx.record
        if record.rebuilt is None:
            raise RuntimeError(f"cell {record.cell} reached its backward before its recompute: the "
                               f"Recompute node must be joined into the graph upstream of it")
        output, leaf = record.rebuilt
        record.rebuilt = None
        if record.split is not None:
            return None, None, record.split.backward(record.cell, output, leaf, grad_output)
        if output.requires_grad:
            torch.autograd.backward(output, grad_output)
        return None, None, leaf.grad if leaf.requires_grad else None


class Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phony: Tensor, record: Recomputation, input: Tensor) -> Tensor:  # type: ignore[override]
        ctx.record = record
        ctx.save_for_backward(input)
        return phony.detach()

    @staticmethod
    def backward(ctx, grad_phony: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        record: Recomputation = ctx.record
        micro, part = record.cell
        record.callbacks.fire("recompute", "before", micro, part)
        (input,) = ctx.saved_tensors
        leaf = input.detach().requires_grad_(input.requires_grad)
        watch = record.split.replaying(record.cell) if record.split is not None else nullcontext()
        with (record.restored_rng(), record.restored_modes(), record.restored_autocast(), torch.enable_grad(),
              _flag("recomputing"), watch):
            output = record.function(leaf)
        record.rebuilt = (output, leaf)
        record.callbacks.fire("recompute", "after", micro, part)
        return None, None, None


# Aliases under activation checkpointing's names, for code written against them.
CheckpointMode = RecomputeMode
Checkpointing = Recomputation
checkpoint_stop = recompute_stop
is_checkpointing = will_recompute
