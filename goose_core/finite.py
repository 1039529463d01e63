"""Non-finite loss or gradients stop the run on every rank, before the optimizer writes them into weights.

A ``nan`` or ``inf`` in the loss or a gradient (inf in the inputs, a learning rate so large that
the weights overflow, a bad kernel) would otherwise train on silently: AdamW turns one ``nan``
gradient into ``nan`` weights, and the next checkpoint holds them. goose checks, once per step,
the gradients the optimizer is about to read, on every rank, before it reads them::

    every rank   found = any non-finite grad of this optimizer (one fused pass, torch's
                         _amp_foreach_non_finite_check_and_unscale_ at scale 1: exact)
                       | any non-finite loss of a forward since the last step
    world        all-reduce MAX of found (one float)       skipped when clip_grad_norm_ or a
                                                           GradScaler already agreed on it
    found        every rank gathers each rank's offenders (the failure path only) and raises
                 NonFiniteError naming the step, the loss, and where the non-finite gradient
                 came first in the backward: the last pipeline stage holding one, its
                 parameter latest in the model

Where goose gets control once per step in every loop: torch's optimizer step pre-hook, which
runs before ``step()`` of *any* ``torch.optim`` optimizer, the plain ones of stages 05 to 13
included (goose never sees those). It is registered once, globally, and acts only on optimizers
whose tensors a goose wrapper marked (:func:`watch`); others are left alone. ZeRO-1 and
``MasterWeights`` step an inner optimizer over their shards or fp32 masters, which they mark too.
``clip_grad_norm_`` folds the flag into its own all-reduce and :class:`~goose_core.GradScaler`
already agrees on found-inf, so with either the check costs one local pass and no collective.
A GradScaler step that found inf is skipped without calling ``step()``: it never raises here.

The weights after a step are not checked: finite gradients with a huge learning rate can write
huge but finite weights, whose next forward makes the loss and gradients non-finite, and that
step stops before writing. ``ParallelContext(check_finite=False)`` (or ``ctx.check_finite =
False`` on every rank) turns the check off.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from goose_core.distributed.context import ParallelContext
from goose_core.distributed.missing import naming_missing
from goose_core.metadata import finite_watch, set_finite_watch

__all__ = ["FiniteGuard", "NonFiniteError", "Watched", "copy_watch", "flat_names", "found_non_finite", "guard_of",
           "install_step_hook", "local_flag", "stops", "vouch", "watch", "watch_like"]


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient, raised on every rank before the optimizer step.

    Attributes:
        step: the optimizer step that was about to run (1 for the first of this process).
        rank, stage, name: where the non-finite gradient came first in the backward (global
            rank, pipeline stage, parameter name); ``name`` is None when only a loss was.
    """

    def __init__(self, message: str, step: int, rank: int, stage: int, name: str | None) -> None:
        super().__init__(message)
        self.step, self.rank, self.stage, self.name = step, rank, stage, name


class Watched(NamedTuple):
    """What a marked tensor carries: its model's guard and who names its non-finite pieces."""

    guard: FiniteGuard
    names: Callable[[Tensor], list[str]]  # the parameters a non-finite gradient holds


class FiniteGuard:
    """One model's check: its context, the steps taken, the losses since the last step, and
    the gradients already agreed finite (by clipping or a GradScaler) for this step."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.steps = 0
        self.order: dict[str, int] = {}  # parameter name -> place in the model
        self.losses: list[Tensor] = []
        self._vouched = False

    def __deepcopy__(self, memo: dict[int, Any]) -> FiniteGuard:
        return self  # a copied model shares the guard (its loss hook): process groups cannot be copied

    def record_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        """A forward hook: keep the training loss (a reference; read only at the step)."""
        loss = getattr(output, "loss", None)
        if torch.is_grad_enabled() and isinstance(loss, Tensor):
            self.losses.append(loss)  # not detached: a dp-mean still being reduced would wait

    def vouch(self) -> None:
        """Every rank agreed (clipping's all-reduce, a GradScaler's found-inf) that the gradients
        and losses are finite: this step's check needs no collective of its own."""
        self._vouched = True

    def before_step(self, tensors: Sequence[Tensor]) -> None:
        """Check ``tensors``' gradients and the losses on every rank; raise on all if any is not finite."""
        try:
            # Whether to reduce must be the same on every rank: a vouch is (it came from a
            # collective), whereas "a gradient written since" would be one rank's view.
            if self.ctx.check_finite and not self._vouched:
                self._check([t for t in tensors if t.grad is not None])
        finally:
            self.losses, self._vouched = [], False
        self.steps += 1

    def found(self, tensors: Sequence[Tensor]) -> Tensor:
        """1 if any of ``tensors``' gradients or a loss since the last step is not finite, else 0
        (this rank's view: local, one fused pass)."""
        found = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        found_non_finite([t.grad for t in tensors if t.grad is not None], found)
        if self.losses:
            with torch.no_grad():
                losses = torch.stack([l.detach().float().reshape(()) for l in self.losses])
            found = torch.maximum(found, (~torch.isfinite(losses)).any().to(found))
        return found

    def _check(self, tensors: list[Tensor]) -> None:
        found = self.found(tensors)
        if self.ctx.world_size > 1:
            with naming_missing():
                dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if found.item():
            self._raise(tensors)

    def _raise(self, tensors: list[Tensor]) -> None:
        """The failure path: gather every rank's offenders, raise the same error everywhere."""
        try:
            mine = self._offenders(tensors)
        except Exception as e:  # a report that failed must not leave the others in the gather
            ctx = self.ctx
            mine = {"rank": ctx.rank, "tp": ctx.tp_rank, "stage": ctx.pp_rank, "dp": ctx.dp_rank,
                    "names": [f"(could not be named: {e!r})"], "loss": None}
        reports: list[dict[str, Any]] = [mine]
        if self.ctx.world_size > 1:
            reports = [{} for _ in range(self.ctx.world_size)]
            with naming_missing():
                dist.all_gather_object(reports, mine)
        raise _error(reports, self.steps + 1)

    def _offenders(self, tensors: list[Tensor]) -> dict[str, Any]:
        names = [n for t in tensors if not bool(torch.isfinite(t.grad).all()) for n in _names(t, t.grad)]
        names = sorted(set(names), key=lambda n: self.order.get(n, -1))
        losses = [float(l.detach().float().reshape(())) for l in self.losses]
        bad = [l for l in losses if not math.isfinite(l)]
        ctx = self.ctx
        return {"rank": ctx.rank, "tp": ctx.tp_rank, "stage": ctx.pp_rank, "dp": ctx.dp_rank,
                "names": names, "loss": bad[0] if bad else None}


def _error(reports: list[dict[str, Any]], step: int) -> NonFiniteError:
    """One message from every rank's report, the same on every rank."""
    grads = [r for r in reports if r["names"]]
    losses = [r for r in reports if r["loss"] is not None]
    parts = [f"non-finite values at optimizer step {step}, stopped before the step on every rank "
             f"(the weights are as the previous step left them)"]
    if losses:
        parts.append(f"the loss was {losses[0]['loss']} on rank(s) {_ranks(losses)}: the forward made it")
    first = max(grads, key=lambda r: (r["stage"], -r["rank"])) if grads else None
    if first is not None:
        parts.append(f"non-finite gradients on rank(s) {_ranks(grads)}; first in the backward on rank "
                     f"{first['rank']} (pipeline stage {first['stage']}, tp rank {first['tp']}, dp rank "
                     f"{first['dp']}): {first['names'][-1]!r} ({len(first['names'])} parameter(s) there)")
    parts.append("check the batch for inf/nan and the learning rate; under fp16, use goose's GradScaler "
                 "(it skips such steps); ParallelContext(check_finite=False) trains on regardless")
    where = first or losses[0]
    return NonFiniteError("; ".join(parts), step, where["rank"], where["stage"],
                          first["names"][-1] if first else None)


def _ranks(reports: list[dict[str, Any]]) -> str:
    ranks = [r["rank"] for r in reports]
    return ", ".join(map(str, ranks)) if len(ranks) <= 8 else f"{len(ranks)} ranks ({ranks[0]}..{ranks[-1]})"


# -- the fused local check ---------------------------------------------------------------------
def found_non_finite(grads: Iterable[Tensor], found: Tensor, inv_scale: Tensor | None = None) -> None:
    """Set ``found`` to 1 if any of ``grads`` holds inf or nan, multiplying them by ``inv_scale``
    in place (1: unchanged, bit for bit). torch's fused kernel, one launch per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g.detach())
    for (device, _), same in groups.items():
        local = torch.zeros((), dtype=torch.float32, device=device)
        scale = inv_scale.to(device) if inv_scale is not None else torch.ones((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(same, local, scale)
        found.copy_(torch.maximum(found, local.to(found.device)))


# -- marking what a model's optimizer steps ------------------------------------------------------
def watch(model: nn.Module, ctx: ParallelContext) -> FiniteGuard:
    """Check ``model``'s gradients before every optimizer step (every wrapper calls this last).

    Idempotent: the model keeps one guard, and each call marks the parameters it holds now
    (a later wrapper may have replaced some). The first call records the model's losses.
    """
    guard = finite_watch(model)
    if not isinstance(guard, FiniteGuard):
        guard = FiniteGuard(ctx)
        set_finite_watch(model, guard)
        model.register_forward_hook(guard.record_loss)
    guard.order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for name, p in model.named_parameters():
        set_finite_watch(p, Watched(guard, lambda _, name=name: [name]))
    install_step_hook()
    return guard


def watch_like(tensor: Tensor, guard: FiniteGuard, names: Callable[[Tensor], list[str]]) -> Tensor:
    """Mark ``tensor`` (a ZeRO-1 shard, an fp32 master) as checked by ``guard``."""
    set_finite_watch(tensor, Watched(guard, names))
    install_step_hook()
    return tensor


def guard_of(tensors: Iterable[Tensor]) -> FiniteGuard | None:
    """The guard of the first marked tensor of ``tensors``, if any."""
    for t in tensors:
        if isinstance(w := finite_watch(t), Watched):
            return w.guard
    return None


def _names(tensor: Tensor, grad: Tensor) -> list[str]:
    """The parameters whose gradient ``grad`` (all or part of ``tensor``'s) is non-finite."""
    w = finite_watch(tensor)
    return w.names(grad) if isinstance(w, Watched) else [f"an unnamed tensor of shape {tuple(tensor.shape)}"]


def flat_names(params: Sequence[Tensor], offsets: Sequence[int], start: int) -> Callable[[Tensor], list[str]]:
    """Who a flat shard's non-finite gradient belongs to: ``params`` laid out at ``offsets`` of a
    flat buffer, the shard starting at ``start`` of it (ZeRO-1)."""
    def names(grad: Tensor) -> list[str]:
        flat, end = grad.reshape(-1), start + grad.numel()
        out: list[str] = []
        for p, o in zip(params, offsets):
            lo, hi = max(o, start), min(o + p.numel(), end)
            if lo < hi and not bool(torch.isfinite(flat[lo - start : hi - start]).all()):
                out += _names(p, flat[lo - start : hi - start])
        return out
    return names


def copy_watch(src: Tensor, dst: Tensor) -> None:
    """``dst`` (an fp32 master of ``src``) is checked and named as ``src`` is."""
    w = finite_watch(src)
    if isinstance(w, Watched):
        watch_like(dst, w.guard, w.names)


def local_flag(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """This rank's non-finite flag for ``tensors`` (and, when goose watches them, their model's
    losses since the last step): what a collective that already runs can agree on for free."""
    guard = guard_of(tensors)
    if guard is not None:
        return guard.found(tensors).to(device)
    flag = torch.zeros((), dtype=torch.float32, device=device)
    found_non_finite([t.grad for t in tensors if t.grad is not None], flag)
    return flag


def vouch(tensors: Sequence[Tensor]) -> None:
    """Every rank agreed, in a collective of its own, that these gradients are finite."""
    guard = guard_of(tensors)
    if guard is not None:
        guard.vouch()


def stops(tensors: Iterable[Tensor]) -> bool:
    """Whether a non-finite gradient among ``tensors`` will stop the run at the step."""
    guard = guard_of(tensors)
    return guard is not None and bool(guard.ctx.check_finite)


# -- the step pre-hook ---------------------------------------------------------------------------
_HOOK: list[Any] = []  # the one registration (torch keeps global optimizer hooks in a dict too)


def install_step_hook() -> None:
    """Register :func:`_before_step` with torch once per process."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_before_step))


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    guard = guard_of(tensors)
    if guard is not None:
        guard.before_step(tensors)
