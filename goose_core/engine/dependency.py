"""Virtual dependencies: empty "phony" tensors that add edges to the autograd graph.

Autograd runs a node once every gradient it waits for has arrived. :func:`fork` gives a tensor a
second, empty output; :func:`join` makes another tensor wait on it. ``depend(a, b)`` therefore
means "in the backward, ``a``'s producer runs only after ``b``'s consumer has finished"::

          forward                                backward
    a ──Fork──► a'  ─► ...               a ◄──Fork◄── a'  ◄─ ...
          │                                    ▲ waits for the phony's gradient
        phony                                phony
          │                                    │
    b ──Join──► b'  ─► cell(b') ...       b ◄──Join◄── b' ◄── cell(b')'s backward

A phony carries no data (it is ``torch.empty(0)``), so the edge costs nothing but ordering.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["get_phony", "fork", "join", "depend"]

_phonies: dict[tuple[torch.device, bool], Tensor] = {}


def get_phony(device: torch.device, *, requires_grad: bool) -> Tensor:
    """An empty tensor on ``device``; cached, since an empty tensor is never written."""
    key = (torch.device(device), requires_grad)
    if key not in _phonies:
        _phonies[key] = torch.empty(0, device=device, requires_grad=requires_grad)
    return _phonies[key]


class Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        phony = get_phony(input.device, requires_grad=False)
        return input.detach(), phony.detach()

    @staticmethod
    def backward(ctx, grad_input: Tensor, grad_phony: Tensor) -> Tensor:  # type: ignore[override]
        return grad_input


class Join(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, phony: Tensor) -> Tensor:  # type: ignore[override]
        return input.detach()

    @staticmethod
    def backward(ctx, grad_input: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_input, None


def fork(input: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` (same value) and a phony whose gradient ``input``'s producer will wait for."""
    if torch.is_grad_enabled() and input.requires_grad:
        return Fork.apply(input)
    return input, get_phony(input.device, requires_grad=False)


def join(input: Tensor, phony: Tensor) -> Tensor:
    """``input`` (same value), whose backward also sends a gradient to ``phony``'s producer."""
    if torch.is_grad_enabled() and (input.requires_grad or phony.requires_grad):
        return Join.apply(input, phony)
    return input


def depend(fork_from: Tensor, join_to: Tensor) -> tuple[Tensor, Tensor]:
    """Make the backward of ``fork_from``'s producer wait until ``join_to``'s consumer is done.

    Returns:
        The new ``(fork_from, join_to)``: use them in place of the old tensors.
    """
    fork_from, phony = fork(fork_from)
    return fork_from, join(join_to, phony)
