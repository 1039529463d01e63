"""ZeRO's cost, exactly: bytes a rank holds and bytes it sends per step, at each stage 0-3.

For the parameters one rank holds after TP and PP (``N`` elements), packed into units of
``n_u`` elements padded to a multiple of ``dp`` (the buckets of :mod:`goose_core.data_parallel`,
ZeRO-3's per-block units), ``P = sum(padded n_u)`` and the shard ``s = P / dp``. Bytes per element:
``w`` the parameters', ``g`` the gradient buffers' (:func:`~goose_core.data_parallel.main_dtype`
by default: 4 for bf16, else the parameters' own), ``m`` the master shards' (the wider of the two
and fp32)::

    stage                       params   grads          masters   optimizer (AdamW)    sent per step (ring, dp)
    0  DP (+MasterWeights)      N w      P g (+ N w)    N m *     2 N m + 4 T          2 (dp-1)/dp P g
    1  ZeRO-1                   N w      P g            s m       2 s m + 4 B          (dp-1)/dp P (g + w)
    2  ZeRO-2                   N w      s g            s m       2 s m + 4 B          (dp-1)/dp P (g + w)
    3  ZeRO-3                   s w      s g            s m       2 s m + 4 B          (dp-1)/dp P (g + 2 w) **

    *  only when the parameters are narrower than fp32 (a bf16 model: MasterWeights' fp32 copy),
       and the bf16 ``p.grad`` copies of the fp32 buckets (+ N w) come with it.
    ** every unit re-gathered for its backward; a unit that stays gathered from its forward to its
       backward (ZeRO-3's non-block rest, any unit under a pipeline) gathers once: P (g + w).
    T: parameter tensors; B: units (AdamW keeps one fp32 ``step`` per tensor it steps). SGD with
    momentum keeps one buffer of the same size and no step.

"grads" is what is held when the backward has finished and the step has not run (ZeRO-2's
full buffers are gone by then; during the backward at most two are alive besides the one
filling, see :mod:`goose_core.data_parallel.reducer`). "sent" counts as
:mod:`goose_core.distributed.traffic` does, the gradient and parameter collectives only (the
loss's mean, the batch check and clipping's norm are a few bytes each and go to other counters).

At dp = 1 a bf16 model with fp32 Adam holds 2 + 4 + 4 + 8 = 18 bytes per parameter at stages
1-3 (plus padding and step counters), and 2 + (4 + 2) + 4 + 8 = 20 at stage 0, where the bf16
``p.grad`` copies of the buckets come on top; sharding divides the terms the table marks ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Hashable, Iterable, Sequence

import torch
from torch import nn

from goose_core.data_parallel.bucket import main_dtype, plan_buckets

__all__ = ["ZeroCost", "zero_cost", "unit_numels"]

#: AdamW's moments per element, and SGD-with-momentum's buffer.
STATES = {"adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class ZeroCost:
    """Bytes one rank holds, by kind, and the bytes it sends over dp in one optimizer step."""

    params: int
    grads: int
    masters: int
    optimizer: int
    sent: Fraction

    @property
    def held(self) -> int:
        return self.params + self.grads + self.masters + self.optimizer


def _width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def unit_numels(params: Iterable[nn.Parameter], bucket_size_mb: float = 25.0,
                key: Callable[[nn.Parameter], Hashable] = lambda p: None,
                first_bucket_bytes: int | None = 2**20) -> list[int]:
    """The element count of each bucket DataParallel builds over ``params`` (in registration
    order, as ``model.parameters()``; ``first_bucket_bytes`` as the reducer's first bucket)."""
    plan = plan_buckets(reversed(list(params)), int(bucket_size_mb * 2**20), key, first_bucket_bytes)
    return [sum(p.numel() for p in ps) for ps in plan]


def zero_cost(units: Sequence[int], dp: int, zero_stage: int, param_dtype: torch.dtype,
              grad_dtype: torch.dtype | None = None, optimizer: str = "adamw", tensors: int | None = None,
              regathered: Sequence[bool] | None = None) -> ZeroCost:
    """The bytes of the module docstring's table for one rank.

    Args:
        units: element counts of the buckets (stages 0-2) or ZeRO-3 units, unpadded.
        dp: data-parallel size.
        zero_stage: 0 (plain DP, optimizer on the whole model), 1, 2 or 3.
        param_dtype: the model's parameter dtype.
        grad_dtype: the gradient buffers' (DataParallel's ``reduce_dtype``; default main_dtype).
        optimizer: ``"adamw"`` or ``"sgd"`` (with momentum).
        tensors: parameter tensors (stage 0's AdamW step counters); required for stage 0 AdamW.
        regathered: per unit, whether ZeRO-3 gathers it again for the backward (default: all).

    Raises:
        ValueError: an unknown stage or optimizer, dp < 1, or stage 0 AdamW without ``tensors``.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if optimizer not in STATES:
        raise ValueError(f"optimizer must be one of {sorted(STATES)}, got {optimizer!r}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if zero_stage == 0 and optimizer == "adamw" and tensors is None:
        raise ValueError("stage 0 AdamW keeps a step counter per parameter tensor: pass tensors=")
    grad_dtype = grad_dtype or main_dtype(param_dtype)
    w, g = _width(param_dtype), _width(grad_dtype)
    m = _width(torch.promote_types(grad_dtype, main_dtype(param_dtype)))
    numel = sum(units)
    padded = [-(-n // dp) * dp for n in units]
    total = sum(padded)
    shard = total // dp
    ring = Fraction(dp - 1, dp)
    states = STATES[optimizer]
    if zero_stage == 0:
        narrow = w < _width(main_dtype(param_dtype))  # MasterWeights keeps fp32 masters
        master_w = _width(main_dtype(param_dtype))
        copies = numel * w if g != w else 0  # p.grad: the bucket slot itself, or a copy in w
        steps = 4 * tensors if optimizer == "adamw" else 0  # type: ignore[operator]
        return ZeroCost(params=numel * w, grads=total * g + copies, masters=numel * master_w if narrow else 0,
                        optimizer=states * numel * (master_w if narrow else w) + steps, sent=2 * ring * total * g)
    steps = 4 * len(units) if optimizer == "adamw" else 0
    params = shard * w if zero_stage == 3 else numel * w
    grads = total * g if zero_stage == 1 else shard * g
    if zero_stage == 3:
        again = regathered if regathered is not None else [True] * len(units)
        gathers = sum(p * (2 if r else 1) for p, r in zip(padded, again))
        sent = ring * (total * g + gathers * w)
    else:
        sent = ring * total * (g + w)
    return ZeroCost(params=params, grads=grads, masters=shard * m, optimizer=states * shard * m + steps, sent=sent)
