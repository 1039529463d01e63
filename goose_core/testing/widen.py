"""A float64 harness model that stays float64: the float32 casts inside 🤗 code become the model's dtype.

🤗 code computes some parts "in at least float32" by writing ``x.float()``,
``x.to(torch.float32)`` or ``softmax(..., dtype=torch.float32)``: right for a bf16 model, a
*narrowing* in a float64 one. Those parts then round in float32, and a parallel layout that
reorders their sums (tensor parallelism splits the heads, the experts' partial outputs, the
gradient of a router or an activation) moves the result by float32's noise, ~1e-7 relative:
far beyond ``PARALLEL``, which is float64's. Measured at tp=2 in the family sweep: Beam (SwiGLU
and router in float32), DeepSeek-V2 and Nemotron-H (float32 routers), Gemma 4 (its norms scale
by ``weight.float()``).

While any module of a widened model runs, a torch function mode rewrites each such request::

    x.float()                     ->  x.to(float64)
    x.to(torch.float32), x.to(device, torch.float32), x.type(torch.float32)
    f(..., dtype=torch.float32)   ->  the same call with torch.float64 (softmax, zeros, arange, ...)

so the family's own code runs unchanged, in float64 end to end, in the reference and the
parallel run alike: the comparison is about the parallelism, with float64's noise as its
tolerance. Only float32 is widened (bf16/fp16 are explicit choices, not "at least fp32"). The
mode is entered by the outermost module call and left when it returns (or raises), so a pipeline
stage calling an inner module, a block or the head alone is covered too. Backward runs the
float64 ops autograd recorded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["WidenFloat32", "widen_float32", "is_widened"]


class WidenFloat32(TorchFunctionMode):
    """Rewrites requests for float32 into ``dtype`` (float64) while active."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dtype = dtype

    def _wide(self, x: Any) -> Any:
        return self.dtype if x is torch.float32 else x

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is Tensor.float:
            func, args = Tensor.to, (args[0], self.dtype, *args[1:])
        elif any(a is torch.float32 for a in args) or any(v is torch.float32 for v in kwargs.values()):
            args = tuple(self._wide(a) for a in args)
            kwargs = {k: self._wide(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _Outermost:
    """Enters the mode at the outermost module call of a model and leaves it when that returns."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.depth = dtype, 0
        self.mode: WidenFloat32 | None = None

    def enter(self, module: nn.Module, args: tuple) -> None:
        if self.depth == 0:
            self.mode = WidenFloat32(self.dtype)
            self.mode.__enter__()
        self.depth += 1

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.depth -= 1
        if self.depth == 0 and self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)


def widen_float32(model: nn.Module) -> nn.Module:
    """Run every float32 request inside ``model``'s forward in ``model``'s dtype (float64);
    in place, returns ``model``. A model that is not float64 is returned unchanged.

    The hooks are on every module that exists now: modules a parallel wrapper swaps in later
    run inside their parent's call, so they are covered as long as the parent is."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype != torch.float64 or is_widened(model):
        return model
    state = _Outermost(dtype)
    for module in model.modules():
        module.register_forward_pre_hook(state.enter)
        module.register_forward_hook(state.leave, always_call=True)
    model.goose_widened = state
    return model


def is_widened(model: nn.Module) -> bool:
    """Whether :func:`widen_float32` was applied to ``model``."""
    return getattr(model, "goose_widened", None) is not None
