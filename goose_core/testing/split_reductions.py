"""Split reductions on one device: every low-precision linear layer summed in pieces, as TP sums it.

A tensor-parallel layer changes *where* a matmul's reduction is rounded, not what it computes.
A row-parallel layer (``o_proj``, ``down_proj``) multiplies each rank's slice of the input
features, rounds that partial product to the activations' dtype, and the all-reduce adds the
partials; a column-parallel layer (``q/k/v``, ``gate/up``, the LM head) does the same to the
input's gradient in the backward::

    one device                         split into parts = 2 (tensor parallelism's rounding)
    y = round(x @ W.T)                 y  = round(x[:, :h] @ W[:, :h].T) + round(x[:, h:] @ W[:, h:].T)
    dx = round(dy @ W)                 dx = round(dy[:, :n] @ W[:n]) + round(dy[:, n:] @ W[n:])

Under :func:`split_reductions` every linear layer whose weight is bf16 or fp16 is computed the
split way in both directions (a superset of what tensor parallelism splits), on one device. A
mixed-precision run trained so is a noise-floor sample of the *same kind* of change a
tensor-parallel run makes, which reordered micro-batches alone do not sample: they never touch
an activation's forward sum (see :mod:`goose_core.testing.tolerances`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["split_reductions"]

_LOW = (torch.bfloat16, torch.float16)


def _sum_of(pieces: Iterator[Tensor]) -> Tensor:
    """The pieces added one after the other, each addition rounded as an all-reduce's is."""
    total = next(pieces)
    for piece in pieces:
        total = total + piece
    return total


class _SplitLinear(torch.autograd.Function):
    """``F.linear`` with its forward reduction (input features) and its input-gradient
    reduction (output features) each split into ``parts`` rounded partial sums."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, parts: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.parts, ctx.has_bias = parts, bias is not None
        out = _sum_of(F.linear(xs, ws) for xs, ws in zip(x.chunk(parts, -1), weight.chunk(parts, -1)))
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = _sum_of(g @ w for g, w in zip(grad.chunk(ctx.parts, -1), weight.chunk(ctx.parts, 0)))
        rows = grad.reshape(-1, grad.shape[-1])
        grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, rows.sum(0) if ctx.has_bias else None, None


class _SplitMode(TorchFunctionMode):
    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out_features, in_features = weight.shape
            if weight.dtype in _LOW and in_features % self.parts == 0 and out_features % self.parts == 0:
                return _SplitLinear.apply(x, weight, bias, self.parts)
        return func(*args, **kwargs)


@contextmanager
def split_reductions(parts: int) -> Iterator[None]:
    """Within the block, bf16/fp16 linear layers sum their reductions in ``parts`` rounded pieces
    (forward and input gradient), as tensor parallelism over ``parts`` ranks rounds them. Layers
    whose sizes ``parts`` does not divide, and full-precision layers, run unchanged.

    Raises:
        ValueError: ``parts`` below 1.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if parts == 1:
        yield
        return
    with _SplitMode(parts):
        yield
