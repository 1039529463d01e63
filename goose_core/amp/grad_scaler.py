"""GradScaler: fp16 dynamic loss scaling whose skip-or-step decision every rank of the 3D grid shares.

fp16 keeps 5 exponent bits: its smallest normal number is 6.1e-5 and its largest 65504, so small
gradients flush to zero. Multiplying the loss by S (a power of two) multiplies every gradient
by S *exactly*; ``unscale_`` divides them back (exactly again) once they sit in the optimizer's
tensors. Too large an S overflows somewhere: then the step is skipped and S halves; after
``growth_interval`` clean steps S doubles. The loop, with clipping on the true gradients::

    loss = model(**batch).loss
    scaler.scale(loss).backward()            # gradients x S
    scaler.unscale_(optimizer)               # gradients / S, found_inf agreed over the world
    clip_grad_norm_(model.parameters(), 1.0, ctx)
    scaler.step(optimizer)                   # skipped on every rank if any rank found inf/NaN
    scaler.update()                          # S x 0.5 after a skip, x 2 after growth_interval
    optimizer.zero_grad()

Which ranks must agree? Every rank that steps a copy or a piece of the same parameters, and
every stage, since a model half-updated across stages or tp shards is no model at all::

                     tp 0   tp 1        found_inf: one MAX all-reduce over the world
    pp 0   dp 0     [r0]   [r1]     shards of the same matrices: must agree (tp)
           dp 1     [r2]   [r3]     replicas of r0, r1 (under ZeRO-1 other optimizer shards, and
                                    an inf lands in ONE dp rank's shard): must agree (dp)
    pp 1   dp 0     [r4]   [r5]     the later layers of the same model: must agree (pp)
           dp 1     [r6]   [r7]

tp x pp x dp is the whole world, so the agreement is one all-reduce of one float over the
default group: the same latency as a per-axis reduction, and it cannot miss an axis.

The gradients read are the optimizer's: ``param_groups``' params and their ``.grad``. An optimizer
that keeps them elsewhere (ZeRO-1's :class:`~goose_core.optim.DistributedOptimizer`, whose
``group_params`` are marked with :func:`~goose_core.metadata.set_grad_shards`) is asked for its
shards first, as :func:`~goose_core.optim.clip_grad_norm_` does: the reduce-scatter happens
there and the scaler unscales the reduced shard.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import naming_missing
from goose_core.finite import found_non_finite, vouch
from goose_core.metadata import grad_shards

__all__ = ["GradScaler"]

Outputs = TypeVar("Outputs", Tensor, list[Tensor], tuple[Tensor, ...])


class _Stage(Enum):
    """Where one optimizer is in the iteration (torch.amp.GradScaler's OptState)."""

    READY = 0
    UNSCALED = 1
    STEPPED = 2


class GradScaler:
    """``torch.amp.GradScaler``'s interface; the inf/NaN check is agreed by every rank of ``ctx``.

    ``unscale_``, ``step`` and ``update`` are collective: every rank calls them in the same
    order (``unscale_`` holds the one all-reduce; ``step`` calls it when it was not called).

    Args:
        ctx: the parallel context (its device holds the scale; its world agrees on found_inf).
            None on one device, without a process group: the scale follows the gradients' device.
        init_scale: the first scale, a power of two so that scaling is exact.
        growth_factor: multiplies the scale after ``growth_interval`` steps without inf/NaN.
        backoff_factor: multiplies the scale after a step with inf/NaN (which is skipped).
        growth_interval: clean steps in a row before the scale grows.
        enabled: False makes every method a pass-through (``step`` just steps).

    Raises:
        ValueError: on every rank, for a factor or interval out of range.
    """

    def __init__(self, ctx: ParallelContext | None = None, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        _check(init_scale, growth_factor, backoff_factor, growth_interval)
        self.ctx = ctx
        self._enabled = enabled
        device = ctx.device if ctx is not None else None
        self._scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self._growth_factor, self._backoff_factor = float(growth_factor), float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0  # clean steps in a row since the scale last changed
        self._states: dict[int, dict[str, Any]] = {}

    # -- the iteration ---------------------------------------------------------------------
    def scale(self, outputs: Outputs) -> Outputs:
        """``outputs`` (a loss, or a list/tuple of them) times the scale.

        A 0-dim half-precision loss comes back in fp32 (as torch's): the scale itself must not
        overflow fp16 before the backward even starts."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return outputs * self._scale.to(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)  # type: ignore[return-value]
        raise ValueError(f"outputs must be a Tensor or a list/tuple of Tensors, got {type(outputs).__name__}")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale and agree on found_inf over the world.

        Call it before clipping; ``step`` calls it otherwise. Collective over every rank.

        Raises:
            RuntimeError: called twice since the last ``update()``, or after ``step()``.
            ValueError: on every rank, when any rank's optimizer holds fp16 gradients (an fp16
                optimizer step loses small updates: keep fp32 parameters under autocast, or
                fp32 master weights).
        """
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads = _gradients(optimizer)
        fp16 = sum(g.dtype == torch.float16 for g in grads)
        if self.ctx is None and grads:  # one device: the unscale kernel wants the scale beside the grads
            self._scale = self._scale.to(grads[0].device)
        found = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        if not fp16:
            # the reciprocal in fp64, as torch's: 1/S of a power of two is exact in fp32 too
            found_non_finite(grads, found, self._scale.double().reciprocal().float())
        state["found_inf"] = self._agree(found, fp16)
        state["stage"] = _Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """``optimizer.step(*args, **kwargs)`` unless a rank found inf/NaN (then every rank skips).

        Returns:
            What ``optimizer.step`` returned, or None for a skipped step.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        state = self._state(optimizer)
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] is _Stage.READY:
            self.unscale_(optimizer)
        state["stage"] = _Stage.STEPPED
        if state["found_inf"].item():
            return None  # skipped: goose's finite check (an optimizer step pre-hook) never sees it
        vouch([p for g in optimizer.param_groups for p in g["params"]])  # agreed finite: no second all-reduce
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Back the scale off after a skipped step, grow it after ``growth_interval`` clean ones.

        Every rank reaches the same scale: found_inf was agreed in ``unscale_``. ``new_scale``
        sets the scale instead (pass the same value on every rank).

        Raises:
            RuntimeError: no optimizer was unscaled or stepped since the last ``update()``.
        """
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale.fill_(float(new_scale))
        else:
            found = [s["found_inf"] for s in self._states.values() if s["found_inf"] is not None]
            if not found:
                raise RuntimeError("No inf checks were recorded prior to update(): call step(optimizer) "
                                   "(or unscale_(optimizer)) first")
            self._advance(bool(torch.stack(found).max().item()))
        self._states = {}

    def _advance(self, skipped: bool) -> None:
        if skipped:
            self._scale.mul_(self._backoff_factor)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker == self._growth_interval:
            self._scale.mul_(self._growth_factor)
            self._growth_tracker = 0

    # -- the agreement ------------------------------------------------------------------------
    def _agree(self, found: Tensor, fp16: int) -> Tensor:
        """found_inf as the MAX over every rank, with any rank's refusal, in one all-reduce."""
        flags = torch.stack([found, torch.tensor(float(fp16 > 0), device=found.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            with naming_missing():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[1].item():
            here = f"{fp16} on this rank" if fp16 else "none on this rank"
            raise ValueError(f"GradScaler cannot unscale fp16 gradients ({here}): an fp16 optimizer step "
                             f"loses small updates. Keep fp32 parameters and run the forward under "
                             f"torch.autocast(..., dtype=torch.float16), or keep fp32 master weights")
        return flags[0]

    def _state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self._states.setdefault(id(optimizer), {"stage": _Stage.READY, "found_inf": None})

    # -- what torch.amp.GradScaler also offers ---------------------------------------------------
    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return float(self._scale.item()) if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def state_dict(self) -> dict[str, Any]:
        """torch.amp.GradScaler's format (empty when disabled); save it after ``update()``."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict()`` of this class or of ``torch.amp.GradScaler`` (a no-op when disabled).

        Raises:
            RuntimeError: an empty state dict (saved from a disabled scaler).
        """
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        _check(state_dict["scale"], state_dict["growth_factor"], state_dict["backoff_factor"],
               state_dict["growth_interval"])
        self._scale.fill_(float(state_dict["scale"]))
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._growth_tracker = int(state_dict["_growth_tracker"])


def _check(init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int) -> None:
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale!r}; the default is 2**16")
    if not growth_factor > 1.0:
        raise ValueError(f"growth_factor must be > 1.0, got {growth_factor!r}; the default is 2.0")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}; the default is 0.5")
    if not (isinstance(growth_interval, int) and growth_interval >= 1):
        raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}; the default is 2000")


def _gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients ``optimizer.step()`` will read: those of its param groups' params (after
    ZeRO-1's reduce-scatter, which asking for the shards triggers)."""
    params = (p for ps in getattr(optimizer, "group_params", ()) for p in ps)
    shards = next((s for p in params if (s := grad_shards(p)) is not None), None)
    if shards is not None:
        shards()  # one call reduce-scatters every bucket (ZeRO-1); later calls are no-ops
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    sparse = [g for g in grads if g.is_sparse]
    if sparse:
        raise ValueError(f"{len(sparse)} sparse gradients: goose's GradScaler unscales dense gradients only")
    return grads

