"""Gradients a step computed inside its forward call (1F1B), handed to ``.grad`` by ``loss.backward()``.

1F1B runs each micro-batch's backward between later micro-batches' forwards, so the whole
backward happens inside ``model(...)``. The training loop still calls ``loss.backward()``;
this module makes that call the one that delivers the gradients::

    model(...)       p.grad (earlier, e.g. accumulated) ──aside──┐
                     1F1B: every backward, seed 1 ──► p.grad ──► parked (this step's)
                     p.grad ◄── earlier ─────────────────────────┘
    loss.backward()  seed s: p.grad += s * parked      (then data parallelism flushes)

Why not leave them in ``.grad`` at once: a loss that never goes backward (a validation loss with
grad on) must not change ``.grad``, and the caller's seed ``s`` (``(loss / k).backward()``,
``GradScaler.scale(loss).backward()``) must count. Every gradient is linear in the seed, so
``s * parked`` is the gradient of ``s * loss``: bit for bit when ``s`` is a power of two and
nothing overflows. In float16 it is not: loss scaling exists to keep small activation gradients
from underflowing *during* the backward, which already ran with seed 1, so a seed other than 1
is refused there.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from goose_core.engine.dependency import get_phony

__all__ = ["ParkedGradients"]


class ParkedGradients:
    """This step's gradients of ``params``, set aside until the caller's ``loss.backward()``.

    Built before the step's backward runs: it moves every ``p.grad`` aside, so the step
    accumulates into fresh ones. :meth:`park` then swaps them: the step's are kept here, the
    earlier ones go back. :meth:`loss` returns the tensor whose backward installs them.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.earlier: list[Tensor | None] = [p.grad for p in self.params]
        self.grads: list[Tensor | None] | None = None
        device = self.params[0].device.type if self.params else "cpu"
        self.float16 = (any(p.dtype == torch.float16 for p in self.params)
                        or (torch.is_autocast_enabled(device)
                            and torch.get_autocast_dtype(device) == torch.float16))
        for p in self.params:
            p.grad = None

    def park(self) -> None:
        """The step's backward is done: keep its gradients here, give back the earlier ones."""
        self.grads = [p.grad for p in self.params]
        self.restore()

    def restore(self) -> None:
        """Put the earlier gradients back (the step's, if not parked, are dropped)."""
        for p, g in zip(self.params, self.earlier):
            p.grad = g
        self.earlier = []

    def loss(self, value: Tensor, on_end: Callable[[], None]) -> Tensor:
        """``value`` as a loss whose backward adds seed x the parked gradients to ``.grad``, then
        queues ``on_end`` (it runs when that backward has ended)."""
        phony = get_phony(value.device, requires_grad=True)
        return Install.apply(self, on_end, value, phony)

    def install(self, seed: Tensor) -> None:
        """Add ``seed`` times the parked gradients to ``.grad``.

        Raises:
            RuntimeError: called twice for one step.
            ValueError: a seed other than 1 in float16 (see the module docstring).
        """
        if self.grads is None:
            raise RuntimeError("this step's gradients were already handed over: with "
                               "schedule='1f1b' the backward ran inside the forward, so call "
                               "loss.backward() once per forward")
        one = bool(seed == 1)
        if not one and self.float16:
            raise ValueError(f"loss.backward() got a gradient seed of {seed.item()} (a scaled loss, e.g. "
                             f"GradScaler), but schedule='1f1b' ran this step's backward inside "
                             f"the forward with seed 1 in float16, where scaling afterwards cannot "
                             f"undo the underflow loss scaling prevents: use schedule='gpipe' with "
                             f"the scaler, or bfloat16 without one")
        grads, self.grads = self.grads, None
        for p, g in zip(self.params, grads):
            if g is None:
                continue
            if not one:
                g = g.mul_(seed)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)


class Install(torch.autograd.Function):
    """The loss of a 1F1B step: its backward installs the parked gradients, scaled by the seed."""

    @staticmethod
    def forward(ctx, parked: ParkedGradients, on_end: Callable[[], None],  # type: ignore[override]
                value: Tensor, phony: Tensor) -> Tensor:
        ctx.parked, ctx.on_end = parked, on_end
        return value.detach().clone()

    @staticmethod
    def backward(ctx, seed: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.parked.install(seed)
        torch.autograd.Variable._execution_engine.queue_callback(ctx.on_end)
        return None, None, None, None
